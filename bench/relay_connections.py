"""bench/relay.py, phase 3: thousands of authenticated connections held open at once, `peers`
listing them all, one paid message still relayed, and first-time registration at that pin count."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchlib import proc_status
from harness.node import NodeProcess
from harness.wire import Wire, load_key
from relay_setup import RSA_KEYS, RelayBench, make_envelope, open_and_announce

GROUPS = 4  # connector processes
THREADS = 32  # concurrent handshakes in each


def connect_all(names, keys: list, port: int, eth_address: str, threads: int, timeout: float = 60) -> tuple:
    """Handshakes from a thread pool: ([open Wire], [failure text])."""
    def connect(item):
        name, key_index = item
        try:
            wire = Wire(port, timeout=timeout)
            wire.handshake(name, *keys[key_index % len(keys)], eth_address)
            wire.sock.settimeout(None)
            return wire
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return f"{name}: {type(exc).__name__}: {exc}"[:300]

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(connect, names))
    return [o for o in outcomes if isinstance(o, Wire)], [o for o in outcomes if isinstance(o, str)]


def connector_main(cfg: dict, barrier, results, stop) -> None:
    """Hold many authenticated connections, and keep every socket open until told to stop."""
    keys = [load_key(path) for path in cfg["key_paths"]]
    barrier.wait(timeout=600)
    started = time.time_ns()
    wires, failures = connect_all(cfg["names"], keys, cfg["port"], cfg["eth_address"], THREADS, timeout=120)
    finished = time.time_ns()
    results.put(("connector", cfg["index"], {"connected": len(wires), "failed": len(failures),
                                             "failure_samples": failures[:5], "started_ns": started,
                                             "finished_ns": finished}))
    stop.wait(900)  # held open until the main process has counted and relayed
    for wire in wires:
        wire.close()


def connection_plan(bench: RelayBench) -> tuple[list, dict]:
    """The names to connect, and the pins to write before the node starts. The node rewrites
    pins.json on every NEW name, so the names are pre-pinned as returning users."""
    bench.relay_sender_address, bench.relay_sender_key = bench.chain.account()
    names = [(f"c{i}", i % RSA_KEYS) for i in range(bench.sizes["connections"] - 2)]
    pins = {name: {"public_key": bench.pems[k], "eth_address": bench.sink_address} for name, k in names}
    pins["c-relay-r"] = {"public_key": bench.pems[0], "eth_address": bench.sink_address}
    pins["c-relay-s"] = {"public_key": bench.pems[1], "eth_address": bench.relay_sender_address}
    return names, pins


def relay_one(sender: Wire, receiver: Wire, book) -> tuple[float | None, bool, str | None]:
    """One paid message from sender to receiver: (ms to its delivery, relayed, problem)."""
    t0 = time.perf_counter()
    sender.write({"type": "send", "to": "c-relay-r", "msg_id": "relay-check-0",
                  "bounty": {"book": book.root.hex(), "index": 0}, "envelope": make_envelope("c-relay-s", "c-relay-r")})
    try:
        deliver = receiver.expect("deliver")
        relay_ms = (time.perf_counter() - t0) * 1e3
        receipt = sender.expect("receipt")
        return relay_ms, deliver["msg_id"] == "relay-check-0" and receipt["status"] == "delivered", None
    except (RuntimeError, OSError) as exc:
        return None, False, str(exc)[:300]


def run_connections(bench: RelayBench, node: NodeProcess, names: list) -> dict:
    total, workers, chain = bench.sizes["connections"], bench.workers, bench.chain
    results, stop = workers.ctx.Queue(), workers.ctx.Event()
    barrier = workers.ctx.Barrier(GROUPS + 1)
    procs = [workers.spawn(connector_main, f"connector {g}", {
        "index": g, "port": node.port, "names": names[g::GROUPS], "key_paths": bench.key_paths,
        "eth_address": bench.sink_address}, barrier, results, stop, results=results, barrier=barrier)
        for g in range(GROUPS)]
    keys = [load_key(p) for p in bench.key_paths[:2]]
    receiver, sender, extra = Wire(node.port), Wire(node.port), []
    try:
        # Two of the connections are ours: a paying sender (book of 4 leaves) and its receiver.
        receiver.handshake("c-relay-r", *keys[0], bench.sink_address)
        welcome = sender.handshake("c-relay-s", *keys[1], bench.relay_sender_address)
        book, _ = open_and_announce(sender, chain.rpc_url, chain.token.address, bench.relay_sender_key,
                                    welcome["node_eth_address"], 4)
        try:
            barrier.wait(timeout=600)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"connections: a worker failed:\n{workers.errors(results)}") from None
        done = {}
        deadline = time.monotonic() + 600
        while len(done) < GROUPS:
            if time.monotonic() > deadline:
                raise RuntimeError("connections: no result within 600 s")
            item = workers.next_result(results, 1)
            if item is not None:
                done[item[1]] = item[2]
        started = min(d["started_ns"] for d in done.values())
        finished = max(d["finished_ns"] for d in done.values())
        held = sum(d["connected"] for d in done.values()) + 2
        status = proc_status(node.pid)
        time.sleep(1)  # let any late close reach the node before we count
        sender.write({"type": "peers"})
        online = len(sender.expect("peers")["names"])
        relay_ms, relayed, relay_problem = relay_one(sender, receiver, book)

        # First-time registration at this pin count: every new name rewrites pins.json.
        new_names = bench.sizes["new_names"]
        t0 = time.perf_counter()
        extra, registration_failures = connect_all([(f"new{i}", i) for i in range(new_names)], keys, node.port,
                                                   bench.sink_address, 8)
        registration = time.perf_counter() - t0
    finally:
        stop.set()
        for wire in [receiver, sender, *extra]:
            wire.close()
        workers.reap(procs, timeout=30)
    failures = [f for d in done.values() for f in d["failure_samples"]][:5]
    seconds = (finished - started) / 1e9
    return {"target": total, "held_open": held, "online_names_in_peers": online,
            "failed": sum(d["failed"] for d in done.values()), "failure_samples": failures,
            "connect_seconds": round(seconds, 2), "connections_per_s": round((held - 2) / seconds),
            "client_processes": GROUPS, "handshake_threads_per_process": THREADS,
            "node_threads": status.get("Threads"), "node_rss": status.get("VmRSS"),
            "relay_with_all_open": relayed, "relay_ms": relay_ms and round(relay_ms, 2),
            "relay_problem": relay_problem,
            "pins_prepinned": True, "new_registrations": new_names,
            "new_registration_ms_each": round(registration / new_names * 1e3, 1),
            "new_registration_failures": len(registration_failures),
            "new_registration_failure_samples": registration_failures[:3]}

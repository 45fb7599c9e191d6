"""An honest pair's latency while one hostile load runs against the same node (issue 12 part 5).

    .venv/bin/python bench/abuse.py [--seconds 6] [--rate 100] [--attackers 2]

One node.py on anvil. An honest pair, alice and bob, send `--rate` paid messages a second
(alice -> bob; bob returns each code, as a client does); a message's latency runs from alice's
write to bob's read of its `deliver`. Each phase runs one hostile load in worker processes
for `--seconds`, beside a quiet baseline:

    quiet       nothing else
    unpaid      sends backed by made-up bounties, pipelined; reconnecting whenever closed
    handshake   hello + a forged auth, over and over, on fresh connections
    big-book    8 MB `book` frames (124k leaves) and 10,000-leaf ones (the largest the node
                parses), for books that do not exist; reconnecting whenever closed
    join        join and leave channels as fast as the node answers (each one an fsync)

The table prints p50/p99/max per phase (ms) and how many hostile frames the node answered.
The node is pinned to the first CPU and the rest run on the others, when there are two or more.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import HOST, RESULTS_DIR, raise_nofile  # noqa: E402
from harness.chain import DevChain  # noqa: E402
from harness.node import NodeProcess  # noqa: E402
from harness.wire import Wire  # noqa: E402
from harness.workers import Workers  # noqa: E402

PHASES = ("quiet", "unpaid", "handshake", "big-book", "join")
ENVELOPE = {"from": "alice", "to": "bob", "msg_id": "m", "ts": 1, "wrapped_key": "QUJD", "nonce": "bm9u",
            "code_slot": "A" * 43 + "=", "digest": "A" * 43 + "=",  # 32 bytes each: key release's fields
            "ciphertext": "QUJD" * 100, "signature": "c2ln"}


# --- hostile loads (each runs in a worker process until `until`, a time.time()) ----------------

def _login(port: int, key_path: str, name: str, eth_address: str) -> Wire:
    from harness.wire import load_key

    key, pem = load_key(key_path)
    wire = Wire(port, timeout=10)
    wire.handshake(name, key, pem, eth_address)
    return wire


def _frame(message: dict) -> bytes:
    from dm import wire

    return wire.encode(message)


def _drain_until_closed(wire: Wire, until: float) -> int:
    """Read and count frames until the node closes the connection (or time is up)."""
    count = 0
    wire.sock.settimeout(max(0.1, until - time.time()))
    try:
        while time.time() < until:
            data = wire.sock.recv(1 << 20)
            if not data:
                break
            count += data.count(b'"type":"error"')
    except OSError:
        pass
    return count


def _logins(port, key_path, name, eth_address, until):
    """A logged-in Wire, again each time the caller is done with the last one, until `until`
    (the node closes a hostile connection; the load comes back on a new one)."""
    while time.time() < until:
        try:
            yield _login(port, key_path, name, eth_address)
        except (OSError, RuntimeError, ValueError):
            continue


def unpaid_flood(port, key_path, name, eth_address, until, results):
    answered = 0
    for wire in _logins(port, key_path, name, eth_address, until):
        burst = b"".join(_frame({"type": "send", "to": "bob", "msg_id": f"x{i}",
                                 "bounty": {"code_hash": secrets.token_hex(32)}, "envelope": ENVELOPE})
                         for i in range(200))
        try:
            wire.sock.sendall(burst)
        except OSError:
            pass
        answered += _drain_until_closed(wire, until)
        wire.close()
    results.put(("done", "unpaid", answered))


def handshake_flood(port, key_path, name, eth_address, until, results):
    from harness.wire import load_key

    _, pem = load_key(key_path)
    hello = _frame({"type": "hello", "name": name, "public_key": pem, "eth_address": eth_address})
    forged = _frame({"type": "auth", "signature": base64.b64encode(secrets.token_bytes(256)).decode()})
    answered = 0
    while time.time() < until:
        try:
            wire = Wire(port, timeout=5)
            wire.sock.sendall(hello)
            wire.expect("challenge")
            wire.sock.sendall(forged)
            answered += 1 + _drain_until_closed(wire, until)
            wire.close()
        except (OSError, RuntimeError, ConnectionError):
            continue
    results.put(("done", "handshake", answered))


def big_book_flood(port, key_path, name, eth_address, until, results):
    leaves = [secrets.token_hex(32) for _ in range(124_000)]
    frame = b"".join([  # the 8 MB frame of the issue, and the largest `book` the node parses (10,000 leaves)
        _frame({"type": "book", "root": secrets.token_hex(32), "leaves": leaves}),
        _frame({"type": "book", "root": secrets.token_hex(32), "leaves": leaves[:10_000]})])
    answered = 0
    for wire in _logins(port, key_path, name, eth_address, until):
        stop = threading.Event()

        def write():
            try:
                while not stop.is_set() and time.time() < until:
                    wire.sock.sendall(frame)
            except OSError:
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answered += _drain_until_closed(wire, until)
        stop.set()
        wire.close()
        writer.join(5)
    results.put(("done", "big-book", answered))


def join_flood(port, key_path, name, eth_address, until, results):
    answered = 0
    for wire in _logins(port, key_path, name, eth_address, until):
        try:
            i = 0
            while time.time() < until:
                channel = f"#flood{i % 90}"
                wire.write({"type": "join", "channel": channel})
                wire.expect("channels")
                wire.write({"type": "leave", "channel": channel})
                wire.expect("channels")
                answered += 2
                i += 1
        except (OSError, RuntimeError, ConnectionError):
            pass
        wire.close()
    results.put(("done", "join", answered))


LOADS = {"unpaid": unpaid_flood, "handshake": handshake_flood, "big-book": big_book_flood, "join": join_flood}


def run_load(phase, port, key_path, name, eth_address, duration, results):
    """A worker: say when ready (spawning a process and importing takes seconds here), then
    run the load for `duration` seconds."""
    import dm.wire  # noqa: F401  (the imports, before the clock starts)

    results.put(("ready", phase, 0))
    LOADS[phase](port, key_path, name, eth_address, time.time() + duration, results)


# --- the honest pair -----------------------------------------------------------------------------

def honest_pair(port: int, alice: Wire, bob: Wire, book, first_leaf: int, count: int, rate: float) -> list[float]:
    """`count` paid messages alice -> bob at `rate` a second; each one's latency in seconds."""
    from dm import wire as dm_wire

    root = book.root.hex()
    latencies = []
    stop = threading.Event()

    def drain_alice():  # receipts and `paid` notices
        alice.sock.settimeout(0.5)
        while not stop.is_set():
            try:
                if not alice.sock.recv(1 << 16):
                    return
            except OSError:
                continue

    drain = threading.Thread(target=drain_alice, daemon=True)
    drain.start()
    interval = 1 / rate
    next_at = time.perf_counter()
    try:
        for n in range(count):
            leaf = first_leaf + n
            msg_id = f"h{leaf}"
            frame = dm_wire.encode({"type": "send", "to": "bob", "msg_id": msg_id,
                                    "bounty": {"book": root, "index": leaf}, "envelope": ENVELOPE})
            started = time.perf_counter()
            alice.sock.sendall(frame)
            while True:
                message = bob.read()
                if message.get("type") == "deliver" and message.get("msg_id") == msg_id:
                    break
            latencies.append(time.perf_counter() - started)
            bob.write({"type": "claim", "msg_id": msg_id, "code": book.codes[leaf].hex()})
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
    finally:
        stop.set()
        drain.join(2)
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6, help="how long each phase runs (default: 6)")
    parser.add_argument("--rate", type=float, default=100, help="honest messages a second (default: 100)")
    parser.add_argument("--attackers", type=int, default=2, help="worker processes per hostile load (default: 2)")
    parser.add_argument("--only", help="comma-separated phases: " + ", ".join(PHASES))
    args = parser.parse_args(argv)
    phases = args.only.split(",") if args.only else list(PHASES)
    raise_nofile()
    from dm import crypto
    from dm.chain import ethereum
    from dm.chain.books import BookSecrets

    cpus = sorted(os.sched_getaffinity(0))
    node_cpus, load_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else (None, None)
    workers = Workers()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dm-abuse-") as tmp_name, DevChain(Path(tmp_name) / "data") as chain:
        tmp = Path(tmp_name)
        keys = {}
        for name in ("alice", "bob", "mallory"):
            key = crypto.generate_private_key(2048)
            path = tmp / f"{name}.pem"
            crypto.save_private_key(path, key)
            keys[name] = (str(path), key, crypto.public_key_pem(key), *chain.account(btk=100_000))
        node = NodeProcess(chain.data, chain.rpc_url, label="abuse", cpus=node_cpus)
        try:
            node.wait_ready()
            alice = Wire(node.port)
            alice.handshake("alice", keys["alice"][1], keys["alice"][2], keys["alice"][3])
            bob = Wire(node.port)
            bob.handshake("bob", keys["bob"][1], keys["bob"][2], keys["bob"][3])
            per_phase = int(args.seconds * args.rate)
            book = BookSecrets.generate(per_phase * len(phases) + 10)
            now = max(int(time.time()), chain.w3.eth.get_block("latest")["timestamp"])
            chain.token.open_book(ethereum.Signer(chain.w3, keys["alice"][4]), book.root, book.size,
                                  node.eth_address, now + 86_400)
            alice.write({"type": "book", "root": book.root.hex(), "leaves": [x.hex() for x in book.leaf_hashes]})
            alice.expect("book")
            time.sleep(2)  # the book's announcement is billed to alice's CPU share: let it pay back
            mallory = keys["mallory"]
            for p, phase in enumerate(phases):
                results = workers.ctx.Queue()
                procs = []
                if phase != "quiet":
                    for i in range(args.attackers):
                        procs.append(workers.spawn(run_load, phase, phase, node.port, mallory[0], f"mallory{i}",
                                                   mallory[3], args.seconds + 2.5, results, results=results,
                                                   cpus=load_cpus))
                    for _ in procs:
                        if workers.next_result(results, timeout=120) is None:
                            raise RuntimeError(f"the {phase} load did not start")
                    time.sleep(1.0)  # the load gets going
                latencies = honest_pair(node.port, alice, bob, book, p * per_phase, per_phase, args.rate)
                answered = 0
                for _ in procs:
                    item = workers.next_result(results, timeout=args.seconds + 30)
                    answered += item[2] if item else 0
                workers.reap(procs)
                row = {"load": phase, "messages": len(latencies), "p50_ms": statistics.median(latencies) * 1e3,
                       "p99_ms": percentile(latencies, 0.99) * 1e3, "max_ms": max(latencies) * 1e3,
                       "hostile_answers": answered}
                rows.append(row)
                print(f"{phase:>10}: p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                      f"max {row['max_ms']:7.2f} ms  ({len(latencies)} honest messages; node answered "
                      f"{answered} hostile frames or handshakes)", flush=True)
            alice.close()
            bob.close()
        except BaseException:
            node.print_tail()
            raise
        finally:
            workers.reap(timeout=5)
            node.stop()
    print("\n| load | honest p50 (ms) | honest p99 (ms) | max (ms) | hostile frames answered |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['load']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['max_ms']:.1f} | "
              f"{row['hostile_answers']} |")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "abuse.json").write_text(json.dumps({"args": vars(args), "cpus": len(cpus),
                                                         "load_average": os.getloadavg(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

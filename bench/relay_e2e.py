"""bench/relay.py, phase 4: real ChatClients end to end (encrypt, pay, relay, decrypt, return the
code), then each part alone, and which part bounds the rate."""
from __future__ import annotations

import collections
import contextlib
import io
import json
import secrets
import threading
import time
from pathlib import Path

from benchlib import HOST
from harness.node import NodeProcess
from relay_setup import RelayBench


def e2e_receiver_main(cfg: dict, results, stop) -> None:
    """A real ChatClient that receives, verifies, decrypts and returns each code (which pays the node)."""
    from dm.client.core import ChatClient, Events

    expected: dict = cfg["expected"]
    state: dict = {}
    lock = threading.Lock()

    def on_message(incoming) -> None:
        now = time.time_ns()
        with lock:
            s = state.setdefault(incoming.sender, {"genuine": 0, "bad": 0, "first_ns": now, "problems": []})
            if incoming.genuine:
                s["genuine"] += 1
            else:
                s["bad"] += 1
                if len(s["problems"]) < 5:
                    s["problems"].append(incoming.problem)
            s["last_ns"] = now
            if s["genuine"] + s["bad"] == expected.get(incoming.sender, -1):
                results.put(("e2e-received", incoming.sender, dict(s)))

    notices: list[str] = []
    client = ChatClient(HOST, cfg["port"], cfg["name"], Path(cfg["data_dir"]), rpc_url=cfg["rpc_url"],
                        events=Events(message=on_message, notice=notices.append))
    client.connect()
    results.put(("e2e-ready", cfg["name"], {}))
    stop.wait(cfg["timeout"])
    with lock:
        results.put(("e2e-final", cfg["name"], {"state": state, "notices": notices[:10]}))
    client.close()


def run_e2e(bench: RelayBench, node: NodeProcess, throughput: float | None) -> dict:
    from dm.chain import devchain, ethereum
    from dm.chain import faucet as dev_faucet
    from dm.cli import accounts

    chain, workers, data = bench.chain, bench.workers, bench.chain.data
    n_book, n_single = bench.sizes["e2e_book"], bench.sizes["e2e_single"]
    with contextlib.redirect_stdout(io.StringIO()):
        accounts.create_users(data, ["e2e-alice", "e2e-bob", "e2e-carol"])
    for name in ("e2e-alice", "e2e-bob", "e2e-carol"):
        address = ethereum.address_of((data / "keys" / f"{name}_ETH.key").read_text().strip())
        dev_faucet.fund_user(chain.token, chain.faucet, address)
    results, stop = workers.ctx.Queue(), workers.ctx.Event()
    receiver = workers.spawn(e2e_receiver_main, "e2e receiver", {
        "port": node.port, "name": "e2e-bob", "data_dir": str(data), "rpc_url": chain.rpc_url,
        "expected": {"e2e-alice": n_book, "e2e-carol": n_single}, "timeout": 600}, results, stop, results=results)
    out: dict = {}
    try:
        item = workers.next_result(results, 120)
        if item is None or item[0] != "e2e-ready":
            raise RuntimeError(f"e2e receiver: {item}")
        out["book"] = send_all(bench, node, "e2e-alice", "book", n_book, results)
        out["single"] = send_all(bench, node, "e2e-carol", "single", n_single, results)
    finally:
        stop.set()
        workers.reap([receiver], timeout=20)
    out["parts"] = parts_alone(bench, n_book, throughput)
    out["bound"] = bound(out)
    return out


class Timed:
    """Seconds and calls spent in functions wrapped with wrap(), wherever they are called from."""

    def __init__(self):
        self.calls, self.seconds = 0, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - t
        return timed


def send_all(bench: RelayBench, node: NodeProcess, name: str, pay: str, count: int, results) -> dict:
    """`count` messages from a ChatClient `name` to e2e-bob: until the last is received and paid."""
    from dm import crypto
    from dm.client.core import ChatClient, Events

    paid: dict = {}
    receipts = collections.Counter()
    cond = threading.Condition()
    notices: list[str] = []

    def on_paid(msg_ids) -> None:
        now = time.time_ns()
        with cond:
            for msg_id in msg_ids:
                paid.setdefault(msg_id, now)
            cond.notify_all()

    def on_receipt(msg_id, status, detail) -> None:
        receipts[status] += 1
        if detail and len(notices) < 5:
            notices.append(detail)

    client = ChatClient(HOST, node.port, name, bench.chain.data, rpc_url=bench.chain.rpc_url, pay=pay,
                        events=Events(paid=on_paid, receipt=on_receipt, notice=notices.append))
    client.connect()
    # The chain part: every openBook (BookSecrets, save, tx, announce), or one registerBounty a message.
    chain = Timed()
    method = "_open_book" if pay == "book" else "next_bounty"
    setattr(client.payer, method, chain.wrap(getattr(client.payer, method)))
    # The encryption in place too: whatever crypto function ChatClient calls.
    sealing = Timed()
    patched = {fn: getattr(crypto, fn) for fn in ("seal", "seal_many") if hasattr(crypto, fn)}
    for fn, original in patched.items():
        setattr(crypto, fn, sealing.wrap(original))
    try:
        client.peer_key("e2e-bob")  # the lookup is once per session; not part of the rate
        first = time.time_ns()
        ids = [client.send_text("e2e-bob", f"message {i} from {name} to e2e-bob") for i in range(count)]
        last_send = time.time_ns()
        received = None
        deadline = time.monotonic() + 300
        while received is None and time.monotonic() < deadline:
            item = bench.workers.next_result(results, 1)
            if item is not None and item[0] == "e2e-received" and item[1] == name:
                received = item[2]
        wanted = set(ids)
        with cond:
            cond.wait_for(lambda: wanted <= paid.keys(), timeout=120)
            paid_ids = wanted & paid.keys()
            last_paid = max((paid[i] for i in paid_ids), default=None)
        client.wait_acknowledged(timeout=30)
    finally:
        for fn, original in patched.items():
            setattr(crypto, fn, original)
        client.close()
    span = lambda end: (end - first) / 1e9 if end else None  # noqa: E731
    recv_s, paid_s = span(received and received["last_ns"]), span(last_paid if len(paid_ids) == count else None)
    return {
        "pay": pay, "messages": count, "send_seconds": round(span(last_send), 3),
        "received_genuine": received and received["genuine"], "received_bad": received and received["bad"],
        "receive_problems": received and received["problems"],
        "seconds_to_last_received": recv_s and round(recv_s, 3),
        "rate_received_msg_s": recv_s and round(count / recv_s, 1),
        "paid": len(paid_ids), "seconds_to_last_paid": paid_s and round(paid_s, 3),
        "rate_paid_msg_s": paid_s and round(count / paid_s, 1),
        "receipts": dict(receipts), "notices": notices[:5],
        "chain_calls": chain.calls, "chain_seconds": round(chain.seconds, 3),
        "chain_ms_per_message": round(chain.seconds / count * 1e3, 3),
        "seal_in_place_seconds": round(sealing.seconds, 3),
        "seal_in_place_ms_per_message": round(sealing.seconds / count * 1e3, 3),
        "sender_other_ms_per_message": round((span(last_send) - chain.seconds - sealing.seconds) / count * 1e3, 3),
    }


def parts_alone(bench: RelayBench, n: int, throughput: float | None) -> dict:
    """What bounds it: the same work, each part alone."""
    from dm import crypto
    from dm.relay.redeemer import Claim, Journal

    keys = bench.chain.data / "keys"
    alice = crypto.load_private_key(keys / "e2e-alice_PRIVATE.pem")
    bob = crypto.load_private_key(keys / "e2e-bob_PRIVATE.pem")

    def payload(i: int) -> dict:
        return {"text": f"message {i} from alice to bob", "code": secrets.token_hex(32)}

    def open_all(envelopes, **options) -> float:
        guard = crypto.ReplayGuard()
        t0 = time.perf_counter()
        for envelope in envelopes:
            crypto.open_envelope(envelope, recipient="e2e-bob", recipient_key=bob,
                                 sender_public_key=alice.public_key(), replay_guard=guard, **options)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    envelopes = [crypto.seal(payload(i), sender="e2e-alice", recipient="e2e-bob", sender_key=alice,
                             recipient_public_key=bob.public_key()) for i in range(n)]
    seal_s = time.perf_counter() - t0
    open_s = open_all(envelopes)
    # What ChatClient does per message: send_text -> seal_many of one envelope with per-peer
    # SessionKeys (RSA wrap once per 1,000), open with an UnwrapCache.
    sessions, cache = crypto.SessionKeys(), crypto.UnwrapCache()
    t0 = time.perf_counter()
    sealed = [crypto.seal_many([(payload(i), "e2e-bob", bob.public_key())], sender="e2e-alice", sender_key=alice,
                               session_keys=sessions)[0] for i in range(n)]
    client_seal = time.perf_counter() - t0
    client_open = open_all(sealed, unwrap_cache=cache)
    client_path = {"seal_ms_each": round(client_seal / n * 1e3, 3), "open_ms_each": round(client_open / n * 1e3, 3),
                   "envelope_bytes": len(json.dumps(sealed[0], separators=(",", ":")))}
    # The node's own per-claim work outside the relay: Journal.add (json + write + fsync).
    journal_n = min(n, 300)
    journal = Journal(bench.tmp / "journal-probe" / "journal.jsonl")  # same filesystem as the node's
    t0 = time.perf_counter()
    for i in range(journal_n):
        journal.add(Claim(f"m{i}", "e2e-alice", secrets.token_bytes(32), secrets.token_bytes(32), i))
    journal_ms = (time.perf_counter() - t0) / journal_n * 1e3
    journal.close()
    return {
        "messages": n, "seal_seconds": round(seal_s, 3), "seal_ms_each": round(seal_s / n * 1e3, 3),
        "open_seconds": round(open_s, 3), "open_ms_each": round(open_s / n * 1e3, 3),
        "real_envelope_bytes": len(json.dumps(envelopes[0], separators=(",", ":"))),
        "node_journal_fsync_ms_each": round(journal_ms, 3),
        "node_relay_ms_each": round(1e3 / throughput, 4) if throughput else None,
        "client_path": client_path,
    }


def bound(e2e: dict) -> dict:
    """Which of chain / crypto / node bounds the end-to-end rate, from per-message costs.

    Sender, node and receiver run concurrently, so the slowest stage sets the rate. When the
    last message arrives right after the sender's loop ends, the sender's loop is that stage;
    inside it, the chain calls and the encryption are timed in place and the rest is client
    overhead (framing, book file saves, its own reader threads, CPU shared with the others)."""
    parts = e2e["parts"]
    client = parts.get("client_path") or {}
    open_ms = client.get("open_ms_each", parts["open_ms_each"])
    node_ms = (parts["node_relay_ms_each"] or 0) + parts["node_journal_fsync_ms_each"]
    out = {}
    for pay in ("book", "single"):
        run = e2e[pay]
        if not run["seconds_to_last_received"]:
            continue
        n = run["messages"]
        measured = run["seconds_to_last_received"] / n * 1e3
        sender = run["send_seconds"] / n * 1e3
        costs = {"chain": run["chain_ms_per_message"], "crypto": run["seal_in_place_ms_per_message"],
                 "client overhead": run["sender_other_ms_per_message"]}
        stages = {"sender": sender, "node": node_ms, "receiver (open_envelope)": open_ms}
        slowest = max(stages, key=stages.get)
        top = max(costs, key=costs.get) if slowest == "sender" else slowest
        share = costs.get(top, stages.get(top, 0)) / measured
        out[pay] = {"measured_ms_per_message": round(measured, 3),
                    "stage_ms_per_message": {k: round(v, 3) for k, v in stages.items()},
                    "sender_ms_per_message": {k: round(v, 3) for k, v in costs.items()},
                    "bound": top, "bound_share": round(share, 2),
                    "summary": (f"{slowest}-bound ({sender:.2f} of {measured:.2f} ms/msg in the sender's loop: "
                                f"chain {costs['chain']:.2f}, crypto {costs['crypto']:.2f}, other "
                                f"{costs['client overhead']:.2f}); node {node_ms:.2f} ms/msg, receiver "
                                f"open {open_ms:.2f} ms/msg")}
    return out

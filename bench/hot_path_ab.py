#!/usr/bin/env python3
"""The node's per-message layer and ledger steps, in-process, in two checkouts side by side.

    .venv/bin/python bench/hot_path_ab.py BEFORE_CHECKOUT AFTER_CHECKOUT [MESSAGES=20000] [ROUNDS=15]

For each checkout: NodeLayer.seal of an empty ciphertext (the relay benchmark's envelopes carry
none) and DeliveryLedger.reserve of the delivery, for MESSAGES book leaves; the minimum of ROUNDS
alternated runs. Finer than bench/relay.py, whose rounds differ by 15% on this machine. A checkout
whose ledger keys a bounty with its payer (dm.relay.ledger.paying) gets the payer appended.
"""
from __future__ import annotations

import binascii
import importlib
import secrets
import sys
import time


def load(checkout: str):
    """That checkout's dm.relay.sealing and dm.relay.ledger (each import of dm starts afresh)."""
    for module in [m for m in sys.modules if m == "dm" or m.startswith("dm.")]:
        del sys.modules[module]
    sys.path.insert(0, checkout)
    try:
        return importlib.import_module("dm.relay.sealing"), importlib.import_module("dm.relay.ledger")
    finally:
        sys.path.remove(checkout)


def runner(sealing, ledger, msg_ids: list[str]):
    secret, root, payer = secrets.token_bytes(32), secrets.token_hex(32), "0x" + secrets.token_hex(20)
    suffix = (payer,) if hasattr(ledger, "paying") else ()
    # Since dm.wire.send's plans, the seal no longer takes the deliver's visible size.
    visible = (500,) if "visible" in sealing.NodeLayer.seal.__code__.co_varnames else ()
    ciphertext = binascii.b2a_base64(b"", newline=False)

    def run() -> None:
        layer, book = sealing.NodeLayer(secret), ledger.DeliveryLedger(300)
        for index, msg_id in enumerate(msg_ids):
            paid_by = ("book", root, index) + suffix
            layer.seal("alice", msg_id, paid_by, ciphertext, *visible)
            book.reserve((msg_id, "alice", "bob", paid_by, 1.0))
    return run


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    before, after = sys.argv[1], sys.argv[2]
    messages = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 15
    msg_ids = [f"m{i}-{secrets.token_hex(8)}" for i in range(messages)]
    runs = {label: runner(*load(path), msg_ids) for label, path in (("before", before), ("after", after))}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for label, run in runs.items():
            started = time.perf_counter()
            run()
            best[label] = min(best[label], time.perf_counter() - started)
    for label, seconds in best.items():
        print(f"{label}: {seconds / messages * 1e6:.2f} µs per message (seal + reserve), min of {rounds}")
    print(f"after - before: {(best['after'] - best['before']) / messages * 1e6:+.2f} µs per message")


if __name__ == "__main__":
    main()

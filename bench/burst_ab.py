#!/usr/bin/env python3
"""The node's whole per-message path, in-process, in two checkouts side by side.

    .venv/bin/python bench/burst_ab.py BEFORE_CHECKOUT AFTER_CHECKOUT [MESSAGES=40000] [ROUNDS=7]

Each checkout runs in its own process: a real Node on eth-tester, a real book of MESSAGES
leaves, and two sans-IO sessions (alice sending, bob online). Alice's session receives
canonical 512-byte sends in reads of 256 KB, as the relay benchmark's node does; the delivery
log is written after each read. No socket, no client: what is timed is the node's own Python
per message (reader, rules, ledger, layer, splice, receipts, log), the minimum over ROUNDS,
the checkouts alternated ABBA on one CPU. bench/relay.py's rounds differ by 15% on this machine; these by ~2%.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
READ_SIZE = 256 * 1024


def child(checkout: str, messages: int, rounds_out: int) -> None:
    """In a fresh process: set the node up from `checkout`, then time bursts on command."""
    sys.path[:0] = [checkout, str(HERE)]
    try:  # both checkouts on the same CPU
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    import contextlib
    import io
    import secrets
    import shutil
    import tempfile

    from dm import datadir
    from dm.chain import devchain, ethereum
    from dm.chain.books import BookSecrets
    from dm.chain.faucet import faucet_signer, fund_user
    from dm.cli import accounts
    from dm.relay.bounties import BountyIndex
    from dm.relay.node import Node
    from dm.relay.session import Session
    from dm.wire import encode
    from dm.wire.send import deliver_prefix
    from relay_setup import make_envelope

    class Transport:  # a session's writer that keeps nothing: the bytes are counted only
        def __init__(self, name):
            self.address, self.label, self.closed, self.written = ("bench", name), name, False, 0

        def send_bytes(self, data):
            self.written += len(data)
            return True

        def send(self, message):
            return self.send_bytes(encode(message))

        post = send_bytes

        def queue(self, frames, outbox):
            self.written += sum(map(len, frames))
            return True

        def flush(self):
            pass

        def close(self):
            self.closed = True

    data_dir = Path(tempfile.mkdtemp(prefix="burst-ab-"))
    with contextlib.redirect_stdout(io.StringIO()):
        accounts.create_users(data_dir, ["alice", "bob"], bits=2048)
    w3 = ethereum.connect(ethereum.TESTER_URL)
    token, _ = devchain.ensure_deployment(w3, ethereum.TESTER_URL, data_dir)
    signer = ethereum.Signer(w3, ethereum.new_account()[1])
    node = Node(token=token, signer=signer, data_dir=data_dir, host="127.0.0.1", port=0,
                index=BountyIndex(token, signer.address), max_unclaimed=10**9, max_book_leaves=10**6, cpu_share=0)
    signers = {name: ethereum.Signer(w3, datadir.read_secret(datadir.eth_key_path(data_dir, name)))
               for name in ("alice", "bob")}
    for name, user in signers.items():
        node.pins.pin(name, datadir.public_key_path(data_dir, name).read_text(), user.address)
    alice_signer = signers["alice"]
    fund_user(token, faucet_signer(w3, data_dir), alice_signer.address, btk=messages * rounds_out * ethereum.TOKEN)
    book = BookSecrets.generate(messages * rounds_out)
    token.open_book(alice_signer, book.root, book.size, signer.address,
                    w3.eth.get_block("latest")["timestamp"] + 86_400)
    node.index.sync()
    assert node.index.announce_book(alice_signer.address, book.root, book.leaf_hashes) is not None

    bob = Session(node, Transport("bob"), now=0.0)
    bob.name, bob.phase = "bob", "ready"
    node.online["bob"] = bob
    alice = Session(node, Transport("alice"), now=0.0)
    alice.name, alice.phase, alice.eth_address = "alice", "ready", alice_signer.address
    alice._deliver_prefix = deliver_prefix("alice")
    envelope, root = make_envelope("alice", "bob"), book.root.hex()
    token_hex = secrets.token_hex(4)
    log = node.delivery_log
    log._file = open(data_dir / "deliveries.log", "ab")
    leaf = 0
    for line in sys.stdin:  # one line per round
        stream = b"".join(encode({"type": "send", "to": "bob", "msg_id": f"{token_hex}-{leaf + i}",
                                  "bounty": {"book": root, "index": leaf + i}, "envelope": envelope})
                          for i in range(messages))
        leaf += messages
        reads = [stream[at:at + READ_SIZE] for at in range(0, len(stream), READ_SIZE)]
        started = time.perf_counter()
        for data in reads:
            alice.receive(data, 1.0)
            log.flush(fsync=False)
        seconds = time.perf_counter() - started
        print(json.dumps({"us": seconds / messages * 1e6, "written": bob.transport.written}), flush=True)
    log._file.close()
    node.server.listener.close()
    node.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    checkouts = {"before": sys.argv[1], "after": sys.argv[2]}
    messages = int(sys.argv[3]) if len(sys.argv) > 3 else 40_000
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 7
    children = {label: subprocess.Popen([sys.executable, "-W", "ignore::ResourceWarning", __file__, "--child",
                                         str(Path(path).resolve()), str(messages), str(rounds)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for label, path in checkouts.items()}
    best = dict.fromkeys(children, float("inf"))
    ratios = []  # after / before, per round: neighbours in time share the machine's drift
    try:
        for round_ in range(rounds):  # ABBA: the second of a pair runs ~10% faster on this machine
            this_round = {}
            for label, proc in (list(children.items()) if round_ % 2 == 0 else reversed(children.items())):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    sys.exit(f"the {label} checkout's process failed: its error is above")
                result = json.loads(line)
                best[label] = min(best[label], result["us"])
                this_round[label] = result["us"]
            ratios.append(this_round["after"] / this_round["before"])
    finally:
        for proc in children.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    for label, us in best.items():
        print(f"{label}: {us:.2f} µs per message ({1e6 / us:,.0f} msg/s of one core), min of {rounds}")
    print(f"after / before: {best['after'] / best['before']:.3f} (minimums); per round, median "
          f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()

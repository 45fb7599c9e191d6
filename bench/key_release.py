#!/usr/bin/env python3
"""Key release: the round trip it adds before a message shows.

    .venv/bin/python bench/key_release.py [--messages 500]

Starts its own anvil and node.py (as bench/relay.py does), opens a real book for one sender,
and sends one message at a time (~512-byte envelope) to one recipient, which returns the code
at once. Per message it times, with one clock (both clients are in this process):

    deliver   send written -> deliver read            what a message took before key release
    release   deliver read -> claim written -> release read   the added round trip (includes
              the node's fsync of its journal before the release goes out)
    shown     send written -> release read            when the text can show now

Prints p50 / p99 / max of each and writes bench/results/key_release.json. One message in
flight at a time: this is the unloaded latency, not the latency under load (bench/relay.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS_DIR, environment, finish, pct
from harness.chain import DevChain
from harness.node import NodeProcess
from harness.wire import Wire
from relay_setup import make_envelope, open_and_announce

RESULTS = RESULTS_DIR / "key_release.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=500, help="messages, one at a time (default %(default)s)")
    args = parser.parse_args()
    from dm import crypto

    started, failed = time.perf_counter(), None
    out = {"environment": environment(), "messages": args.messages}
    report = ""
    with tempfile.TemporaryDirectory(prefix="dm-key-release-") as tmp, DevChain(Path(tmp) / "data") as chain:
        node = None
        try:
            node_data = Path(tmp) / "node-data"
            (node_data / "node").mkdir(parents=True, mode=0o700)
            (node_data / "deployment.json").write_bytes((chain.data / "deployment.json").read_bytes())
            # No redemption while measuring (as bench/relay.py): the claims are still journalled and fsynced.
            node = NodeProcess(node_data, chain.rpc_url, batch_size=1_000_000, batch_wait=3600).wait_ready()
            keys = [crypto.generate_private_key(2048) for _ in range(2)]
            sender_address, sender_eth = chain.account(btk=args.messages + 10)
            receiver_address, _ = chain.account(btk=1)
            sender, receiver = Wire(node.port), Wire(node.port)
            welcome = sender.handshake("sender", keys[0], crypto.public_key_pem(keys[0]), sender_address)
            receiver.handshake("receiver", keys[1], crypto.public_key_pem(keys[1]), receiver_address)
            book, _ = open_and_announce(sender, chain.rpc_url, chain.token.address, sender_eth,
                                        welcome["node_eth_address"], args.messages)
            deliver_ms, release_ms, shown_ms = [], [], []
            for i in range(args.messages):
                envelope = make_envelope("sender", "receiver")
                frame = {"type": "send", "to": "receiver", "msg_id": envelope["msg_id"],
                         "bounty": {"book": book.root.hex(), "index": i}, "envelope": envelope}
                sent = time.perf_counter()
                sender.write(frame)
                receiver.expect("deliver")
                delivered = time.perf_counter()
                receiver.write({"type": "claim", "msg_id": envelope["msg_id"], "code": book.codes[i].hex()})
                receiver.expect("release")
                released = time.perf_counter()
                sender.expect("receipt")
                deliver_ms.append((delivered - sent) * 1e3)
                release_ms.append((released - delivered) * 1e3)
                shown_ms.append((released - sent) * 1e3)
            rows = []
            for name, values in (("deliver", deliver_ms), ("release", release_ms), ("shown", shown_ms)):
                figures = {"p50_ms": round(pct(values, 50), 3), "p99_ms": round(pct(values, 99), 3),
                           "max_ms": round(max(values), 3)}
                out[name] = figures
                rows.append(f"| {name} | {figures['p50_ms']} | {figures['p99_ms']} | {figures['max_ms']} |")
            report = ("| one message at a time | p50 ms | p99 ms | max ms |\n|---|---|---|---|\n" + "\n".join(rows)
                      + f"\n\nload average at start {out['environment']['loadavg_at_start']:.1f}")
            sender.close()
            receiver.close()
        except BaseException as exc:  # recorded in the results; the report says what failed
            failed = exc
            if node is not None:
                node.print_tail()
        finally:
            if node is not None:
                node.stop()
    return finish(out, started, failed, RESULTS, report or f"failed: {failed!r}")


if __name__ == "__main__":
    sys.exit(main())

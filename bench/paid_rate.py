#!/usr/bin/env python3
"""Paid, encrypted messages per second for one sender, through the real CLIs.

    .venv/bin/python bench/paid_rate.py [--messages 5000] [--single-messages 300]

Starts its own anvil and node.py, a receiving client.py, then pipes N lines
into a sending client.py: with bounty books (the default) and with one
registerBounty per message (--pay single). Each message is encrypted,
signed, paid, relayed, decrypted, verified, and its code returned to the
node. The rate is counted from the moment the sender is connected (so its
process start-up is left out) to the last line the receiver prints; the time
until the node has redeemed every code is reported too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import HOST, RESULTS_DIR, ROOT, interrupt_on_sigterm
from dm.chain import ethereum
from dm.cli import accounts
from harness.chain import DevChain
from harness.node import NodeProcess

RESULTS = RESULTS_DIR / "paid_rate.json"


def start_client(procs: list, env: dict, port: int, me: str, peer: str, *extra: str, stdout=subprocess.PIPE):
    """client.py in a subprocess (kept in `procs`, so it is stopped whatever happens), once connected."""
    proc = subprocess.Popen([sys.executable, "client.py", HOST, str(port), me, peer, *extra], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    if not proc.stderr.readline().startswith("connected"):
        raise RuntimeError(f"client.py {me} did not connect")
    return proc


def run_case(procs: list, env: dict, node: NodeProcess, chain: DevChain, pay: str, count: int) -> dict:
    sender, receiver = f"s_{pay}", f"r_{pay}"
    accounts.create_users(chain.data, [sender, receiver])
    stamps: list[float] = []
    recv = start_client(procs, env, node.port, receiver, sender)
    threading.Thread(target=lambda: [stamps.append(time.perf_counter()) for _ in recv.stdout], daemon=True).start()
    extra = ["--pay", "single"] if pay == "single" else ["--book-size", str(count)]
    node_address = node.eth_address
    earned_before = chain.token.balance_of(node_address)
    lines = "".join(f"message {i:06d} {'x' * 40}\n" for i in range(count))
    started = time.perf_counter()
    send = start_client(procs, env, node.port, sender, receiver, *extra, stdout=subprocess.DEVNULL)
    connected = time.perf_counter()  # start-up (imports, handshake) ends here
    send.stdin.write(lines)
    send.stdin.close()
    send.wait(900)
    deadline = time.monotonic() + 120
    while len(stamps) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    while chain.token.balance_of(node_address) - earned_before < count * ethereum.TOKEN and time.monotonic() < deadline:
        time.sleep(0.05)
    all_paid = time.perf_counter()
    recv.stdin.close()
    recv.wait(30)
    received = len(stamps)
    span = stamps[-1] - connected if received else float("nan")
    return {"pay": pay, "messages": count, "received": received, "sender_exit": send.returncode,
            "rate_msg_s": round(received / span, 1) if received else 0.0,
            "connected_to_last_received_s": round(span, 3),
            "sender_startup_s": round(connected - started, 3),
            "connected_to_all_redeemed_s": round(all_paid - connected, 3),
            "redeemed": int((chain.token.balance_of(node_address) - earned_before) // ethereum.TOKEN)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--single-messages", type=int, default=300)
    args = parser.parse_args()
    interrupt_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="paid-rate-bench-") as tmp:
        chain = DevChain(Path(tmp) / "data")
        node, procs = None, []
        try:
            chain.start()
            env = {**os.environ, "DM_DATA_DIR": str(chain.data), "DM_RPC_URL": chain.rpc_url,
                   "PYTHONUNBUFFERED": "1"}
            node = NodeProcess(chain.data, chain.rpc_url).wait_ready()
            results = [run_case(procs, env, node, chain, "book", args.messages),
                       run_case(procs, env, node, chain, "single", args.single_messages)]
        except BaseException:
            if node is not None:
                node.print_tail()
            raise
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if node is not None:
                node.stop()
            chain.stop()
    print(f"\nOne sender, paid and encrypted, through node.py on anvil ({os.cpu_count()} CPUs)\n")
    print("| payment | messages | received | messages/s | until all redeemed |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['pay']} | {r['messages']:,} | {r['received']:,} | {r['rate_msg_s']:,.0f} | "
              f"{r['connected_to_all_redeemed_s']:.1f} s ({r['redeemed']:,} redeemed) |")
    print("\nmessages/s: from the sender being connected (after its start-up) to the receiver printing the\n"
          "last message; it includes paying (opening books or registering bounties), sealing, relaying,\n"
          "opening and returning codes.")
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    target = results[0]["rate_msg_s"] >= 1000
    print(f"\ntarget >= 1,000 paid messages/s with books: {'MET' if target else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchlib import free_port  # noqa: E402

from dm.chain import devchain  # noqa: E402
from dm.cli import accounts as main_cli  # noqa: E402
from dm.chain import ethereum as wu  # noqa: E402


def run_case(env: dict, port: int, data: Path, token, pay: str, count: int) -> dict:
    py = sys.executable
    sender, receiver = f"s_{pay}", f"r_{pay}"
    main_cli.create_users(data, [sender, receiver])
    stamps: list[float] = []
    recv = subprocess.Popen([py, "client.py", "127.0.0.1", str(port), receiver, sender], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert recv.stderr.readline().startswith("connected"), "receiver did not connect"
    threading.Thread(target=lambda: [stamps.append(time.perf_counter()) for _ in recv.stdout], daemon=True).start()
    extra = ["--pay", "single"] if pay == "single" else ["--book-size", str(count)]
    node_address = wu.address_of((data / "node" / "node_ETH.key").read_text())
    earned_before = token.balance_of(node_address)
    lines = "".join(f"message {i:06d} {'x' * 40}\n" for i in range(count))
    started = time.perf_counter()
    send = subprocess.Popen([py, "client.py", "127.0.0.1", str(port), sender, receiver, *extra], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert send.stderr.readline().startswith("connected"), "sender did not connect"
    connected = time.perf_counter()  # start-up (imports, handshake) ends here
    send.stdin.write(lines)
    send.stdin.close()
    send.wait(900)
    deadline = time.monotonic() + 120
    while len(stamps) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    while token.balance_of(node_address) - earned_before < count * wu.TOKEN and time.monotonic() < deadline:
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
            "redeemed": int((token.balance_of(node_address) - earned_before) // wu.TOKEN)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--single-messages", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        url = f"http://127.0.0.1:{free_port()}"
        w3, anvil = devchain.ensure_chain(url, data)
        node = None
        try:
            token, _ = devchain.ensure_deployment(w3, url, data)
            env = {**os.environ, "DM_DATA_DIR": str(data), "DM_RPC_URL": url, "PYTHONUNBUFFERED": "1"}
            port = free_port()
            node = subprocess.Popen([sys.executable, "node.py", "--host", "127.0.0.1", "--port", str(port),
                                     "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            assert node.stdout.readline().startswith("node ready")
            results = [run_case(env, port, data, token, "book", args.messages),
                       run_case(env, port, data, token, "single", args.single_messages)]
        finally:
            if node is not None:
                node.terminate()
                node.wait(30)
            anvil.stop()
    print(f"\nOne sender, paid and encrypted, through node.py on anvil ({os.cpu_count()} CPUs)\n")
    print("| payment | messages | received | messages/s | until all redeemed |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['pay']} | {r['messages']:,} | {r['received']:,} | {r['rate_msg_s']:,.0f} | "
              f"{r['connected_to_all_redeemed_s']:.1f} s ({r['redeemed']:,} redeemed) |")
    print("\nmessages/s: from the sender being connected (after its start-up) to the receiver printing the\n"
          "last message; it includes paying (opening books or registering bounties), sealing, relaying,\n"
          "opening and returning codes.")
    out = ROOT / "bench" / "results" / "paid_rate.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    target = results[0]["rate_msg_s"] >= 1000
    print(f"\ntarget >= 1,000 paid messages/s with books: {'MET' if target else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo: a local chain, a node and two scripted clients, with the BTK
balances before and after. Run through `python3 main.py demo` (or `make demo`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dm import PROJECT_ROOT, datadir
from dm.chain import devchain, ethereum
from dm.cli.accounts import create_users, unspent_in_books
from dm.net import free_port

ROOT = PROJECT_ROOT
ALICE_LINES = ["Hi Bob! This message is end-to-end encrypted; the node only sees ciphertext.",
               "Each message carries a secret code that pays the node 1 BTK once you receive it.",
               "Here is a long one: " + "lorem ipsum " * 40]
BOB_LINES = ["Hi Alice, got all of it. Paying the node with my replies too."]


def _balances(token: ethereum.BountyToken, accounts: dict[str, str]) -> dict[str, float]:
    return {name: token.balance_of(address) / ethereum.TOKEN for name, address in accounts.items()}


class _Client:
    def __init__(self, port: int, me: str, peer: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, "client.py", "127.0.0.1", str(port), me, peer, "--book-size",
                                      "10"], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.received: list[str] = []
        self.connected = threading.Event()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self):
        for line in self.proc.stdout:
            self.received.append(line.rstrip("\n"))

    def _read_err(self):
        for line in self.proc.stderr:
            if line.startswith("connected to"):
                self.connected.set()
            else:
                notice = line.rstrip()
                print(f"   {notice}" if notice.startswith("(") else f"   ({notice})")

    def say(self, lines: list[str]) -> None:
        for line in lines:
            self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def _escrow(token: ethereum.BountyToken, data_dir: Path, name: str) -> float:
    """BTK still unspent in a user's open books (the node has none)."""
    return unspent_in_books(token, data_dir, name) if name != "node" else 0.0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ethereum.ChainError(f"the demo timed out waiting for {what}")
        time.sleep(0.05)


def run(data_dir: Path, rpc_url: str, port: int = 0) -> int:
    for name in ("alice", "bob"):
        if not datadir.private_key_path(data_dir, name).exists():
            create_users(data_dir, [name])
    w3, anvil = devchain.ensure_chain(rpc_url, data_dir)
    node = None
    clients: list[_Client] = []
    try:
        token, record = devchain.ensure_deployment(w3, rpc_url, data_dir)
        print(f"\nchain {record.chain_id} at {rpc_url}; BountyToken at {record.address}")
        port = port or free_port()
        env = {**os.environ, "DM_DATA_DIR": str(data_dir), "DM_RPC_URL": rpc_url, "PYTHONUNBUFFERED": "1"}
        node = subprocess.Popen([sys.executable, "node.py", "--host", "127.0.0.1", "--port", str(port),
                                 "--batch-wait", "0.5", "--log-level", "warning"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True)
        if not node.stdout.readline().startswith("node ready"):
            raise ethereum.ChainError("the node did not start; run `python3 node.py` to see why")
        node_address = ethereum.address_of(datadir.read_eth_key(data_dir / "node" / "node_ETH.key"))
        accounts = {"alice": ethereum.address_of(datadir.read_eth_key(datadir.eth_key_path(data_dir, "alice"))),
                    "bob": ethereum.address_of(datadir.read_eth_key(datadir.eth_key_path(data_dir, "bob"))),
                    "node": node_address}
        bob = _Client(port, "bob", "alice", env)
        bob.connected.wait(60)
        alice = _Client(port, "alice", "bob", env)
        clients = [bob, alice]
        alice.connected.wait(60)
        # The node funds new users on their first login, in the background: wait for it, or
        # the funding would land between "before" and "after" and the table would not add up.
        _wait(lambda: all(token.balance_of(accounts[name]) > 0 for name in ("alice", "bob")), 60,
              "the node to fund alice and bob")
        before = _balances(token, accounts)
        escrow_before = {name: _escrow(token, data_dir, name) for name in accounts}
        print("\nconversation (alice and bob pay from prepaid books of 10 codes):")
        alice.say(ALICE_LINES)
        _wait(lambda: len(bob.received) == len(ALICE_LINES), 60, "bob to receive alice's messages")
        bob.say(BOB_LINES)
        _wait(lambda: len(alice.received) == len(BOB_LINES), 60, "alice to receive bob's reply")
        for line in bob.received:
            print(f"  bob's screen:   {line[:100]}{'...' if len(line) > 100 else ''}")
        for line in alice.received:
            print(f"  alice's screen: {line}")
        delivered = len(ALICE_LINES) + len(BOB_LINES)
        _wait(lambda: token.balance_of(node_address) / ethereum.TOKEN - before["node"] >= delivered, 60,
              "the node to redeem the codes")
        after = _balances(token, accounts)
        print(f"\nBTK balances ({delivered} messages delivered); change + escrowed = net cost:")
        print(f"  {'':8} {'before':>10} {'after':>10} {'change':>8} {'escrowed':>9} {'net cost':>9}")
        total = 0.0
        for name in accounts:
            escrowed = _escrow(token, data_dir, name) - escrow_before[name]  # put in open books during the run
            change = after[name] - before[name]
            net = change + escrowed
            total += net
            print(f"  {name:8} {before[name]:10g} {after[name]:10g} {change:+8g} {escrowed:+9g} {net:+9g}")
        print(f"  {'total':8} {'':10} {'':10} {'':8} {'':9} {total:+9g}")
        print("  'escrowed' is what this run put in a sender's open books and is still unspent: codes that\n"
              "  come back after the book expires (`python3 main.py refund NAME`). Net, each delivered\n"
              f"  message cost its sender 1 BTK and paid the node 1 BTK, so the net costs add up to "
              f"{total:g}.")
        return 0
    finally:
        for client in clients:
            if client.proc.poll() is None:
                client.finish()
        if node is not None:
            node.terminate()
            node.wait(30)
        devchain.stop_on_exit(anvil)

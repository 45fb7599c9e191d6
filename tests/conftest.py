"""Shared fixtures: a real chain (eth-tester in-process, or anvil), a real node
on a free port, real users with keys generated here."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dm import datadir

from dm.chain import devchain, ethereum
from dm.chain.books import BookSecrets
from dm.chain.faucet import faucet_signer, fund_user
from dm.cli import accounts
from dm.client.core import ChatClient, Events
from dm.net import free_port  # noqa: F401  (re-exported to the test modules)
from dm.relay.bounties import BountyIndex
from dm.relay.node import Node
from helpers import login, start_node, user_keys

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def make_users(data_dir: Path, *names: str) -> None:
    """Test users get 2,048-bit keys (the smallest accepted): `main.py Y` makes 3,072-bit
    ones, but generating those is several times slower and the suite makes many users."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert accounts.create_users(data_dir, list(names), bits=2048) == 0


@contextlib.contextmanager
def logged_in_sockets(port: int, data_dir: Path, *names: str):
    """Raw sockets to the node on `port`, each logged in as one of `names` (users made here
    when missing); closed on the way out."""
    make_users(data_dir, *[n for n in names if not datadir.private_key_path(data_dir, n).exists()])
    with contextlib.ExitStack() as stack:
        socks = {}
        for name in names:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            stack.callback(sock.close)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert login(sock, data_dir, name)["type"] == "welcome"
            socks[name] = sock
        yield socks


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def tester_chain(data_dir):
    """eth-tester with BountyToken deployed through the same code path as anvil."""
    w3 = ethereum.connect(ethereum.TESTER_URL)
    token, _ = devchain.ensure_deployment(w3, ethereum.TESTER_URL, data_dir)
    return w3, token


class RunningNode:
    def __init__(self, node: Node):
        self.node = node
        self.port = node.port
        self.address = node.signer.address

    def client(self, name: str, events: Events | None = None, **options) -> ChatClient:
        client = ChatClient("127.0.0.1", self.port, name, self.data_dir, rpc_url=ethereum.TESTER_URL,
                            events=events, w3=self.node.token.w3, **options)
        client.connect()
        self.clients.append(client)
        return client


@pytest.fixture
def tester_node(data_dir, tester_chain):
    """A node in this process on eth-tester, redeeming quickly."""
    w3, token = tester_chain
    running = RunningNode(start_node(token, data_dir, faucet=faucet_signer(w3, data_dir)))
    running.data_dir = data_dir
    running.clients = []
    yield running
    for client in running.clients:
        client.close()
    running.node.stop()


@pytest.fixture
def extra_nodes(tester_chain, data_dir, tmp_path):
    """Builds more nodes on the same chain (each with its own node directory)."""
    w3, token = tester_chain
    started: list[Node] = []
    faucet = faucet_signer(w3, data_dir)  # one Signer per key: one nonce sequence

    def build(name: str, **options) -> Node:
        node_dir = tmp_path / name
        node_dir.mkdir(mode=0o700)
        node = start_node(token, node_dir, faucet=faucet, **options)
        started.append(node)
        return node

    yield build
    for node in started:
        node.stop()


RELAY_HUB_BOOK_SIZE = 4


@pytest.fixture
def relay_hub(tester_chain, data_dir):
    """A node's shared parts on eth-tester (no sockets served), alice and bob pinned and
    online, #c holding both, and a book of alice's announced."""
    w3, token = tester_chain
    make_users(data_dir, "alice", "bob", "carol")
    signer = ethereum.Signer(w3, ethereum.new_account()[1])
    node = Node(token=token, signer=signer, data_dir=data_dir, host="127.0.0.1", port=0,
                index=BountyIndex(token, signer.address))
    for name in ("alice", "bob", "carol"):
        _, pem, eth = user_keys(data_dir, name)
        node.pins.pin(name, pem, eth)
    node.channels.join("#c", "alice")
    node.channels.join("#c", "bob")
    alice_signer = ethereum.Signer(w3, (data_dir / "keys" / "alice_ETH.key").read_text().strip())
    fund_user(token, faucet_signer(w3, data_dir), alice_signer.address)
    book = BookSecrets.generate(RELAY_HUB_BOOK_SIZE)
    now = w3.eth.get_block("latest")["timestamp"]
    token.open_book(alice_signer, book.root, RELAY_HUB_BOOK_SIZE, signer.address, now + 86_400)
    node.index.sync()
    assert node.index.announce_book(alice_signer.address, book.root, book.leaf_hashes) is not None
    yield node, book
    node.server.listener.close()
    node.stop()


def collecting_events():
    """(inbox queue of Incoming, receipts by msg_id, paid msg_ids, Events wired to them)."""
    import queue

    inbox: queue.Queue = queue.Queue()
    receipts: dict[str, str] = {}
    paid: list[str] = []
    return inbox, receipts, paid, Events(
        message=inbox.put,
        receipt=lambda msg_id, status, detail: receipts.__setitem__(msg_id, status),
        paid=paid.extend,
    )


def wait_until(predicate, timeout: float = 30, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


@pytest.fixture
def anvil_chain(tmp_path):
    """A real anvil started by the project's own launcher, on a free port."""
    data = tmp_path / "anvil-data"
    data.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    w3, anvil = devchain.ensure_chain(url, data)
    assert anvil is not None
    token, record = devchain.ensure_deployment(w3, url, data)
    yield {"url": url, "w3": w3, "token": token, "record": record, "data_dir": data, "anvil": anvil}
    anvil.stop()


class Process:
    """A CLI subprocess with line-oriented stdout collected in the background."""

    def __init__(self, args: list[str], env: dict, stdin=subprocess.PIPE):
        self.proc = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self.errors: list[str] = []
        import threading

        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.errors), daemon=True).start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.append(line.rstrip("\n"))

    def write(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait_for_line(self, predicate, timeout: float = 60, stream: str = "lines") -> str:
        return wait_until(lambda: next((l for l in getattr(self, stream) if predicate(l)), None), timeout,
                          message=f"a matching line (have stdout={self.lines[-5:]}, stderr={self.errors[-5:]})")

    def stop(self, sig=None) -> int:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def processes():
    started: list[Process] = []

    def start(args, env, **kw) -> Process:
        proc = Process(args, env, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def started():
    """Terminals and processes a test starts (anything with stop()), stopped at its end."""
    things: list = []
    yield things
    for thing in reversed(things):
        thing.stop()


def cli_env(url: str, data_dir: Path) -> dict:
    return {**os.environ, "DM_RPC_URL": url, "DM_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


logging.getLogger("node").setLevel(logging.WARNING)

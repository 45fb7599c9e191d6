"""A chat client without a terminal: connect, authenticate, pay, encrypt,
send; verify, decrypt, show, and return the code. client.py puts a terminal
on it; the tests drive it directly.

ChatClient composes one part per concern: the connection (socket, handshake,
requests by id), the peers' pinned keys, payment, sending, and receiving.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dm import crypto, datadir, wire
from dm.chain import ethereum
from dm.client.connection import CLOSED, Connection
from dm.client.errors import ClientError
from dm.client.payment import payer_for
from dm.client.peers import PeerKeys, UnusableKey
from dm.client.receiving import RELEASE_TIMEOUT, Incoming, Receiver
from dm.client.sending import MAX_TEXT_BYTES, Outstanding, Sender, Unanswered, check_length
from dm.wire.handshake import ClientHandshake

NOTICE = "_notice"  # put on the inbox by the client itself: {"type": NOTICE, "text": ...}

__all__ = ["ChatClient", "ClientError", "Events", "Incoming", "MAX_TEXT_BYTES", "Outstanding", "check_length"]


@dataclass
class Events:
    """Callbacks; each runs on the client's worker thread."""
    message: Callable[[Incoming], None] = lambda m: None
    receipt: Callable[[str, str, str], None] = lambda msg_id, status, detail: None  # delivered|offline|refused
    paid: Callable[[list[str]], None] = lambda msg_ids: None
    notice: Callable[[str], None] = lambda text: None
    closed: Callable[[str], None] = lambda reason: None


class ChatClient:
    """One user's session with one node.

    Thread-safety: any thread may call the public methods. Each part guards its own
    state (see their docstrings): the Connection its writes and waiting requests,
    PeerKeys the pins, Unanswered the sent messages, the payer its book. One worker
    thread handles everything the node sends unasked, in order, and is the only
    thread that runs the Events callbacks and the Receiver. connect() sets `welcome`,
    `payer` and the sender once, before any other call needs them.
    """

    def __init__(self, host: str, port: int, me: str, data_dir: Path, rpc_url: str = ethereum.DEFAULT_RPC_URL,
                 pay: str = "book", book_size: int = 100, expiry_seconds: int = 86_400, events: Events | None = None,
                 w3=None, release_timeout: float = RELEASE_TIMEOUT):
        self.host, self.port, self.me, self.data_dir = host, port, datadir.check_name(me), data_dir
        self.rpc_url, self.pay, self.book_size, self.expiry_seconds = rpc_url, pay, book_size, expiry_seconds
        self.events = events or Events()
        self._w3 = w3
        try:
            self.rsa_key = crypto.load_private_key(datadir.private_key_path(data_dir, me))
            self.eth_key = datadir.read_secret(datadir.eth_key_path(data_dir, me))
        except (crypto.KeyFileError, datadir.DataError):
            raise ClientError(f"no keys for {me!r} in {data_dir}: run `python3 main.py Y {me}` first") from None
        self.public_pem = crypto.public_key_pem(self.rsa_key)
        self.eth_address = ethereum.address_of(self.eth_key)
        self.client_dir = data_dir / "clients" / me
        (self.client_dir / "books").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._connection = Connection(host, port)
        self._peer_keys = PeerKeys(data_dir, self.client_dir / "peers.json", self._lookup)
        self._receiver = Receiver(self.me, self.rsa_key, self.peer_key, release_timeout)
        self._unanswered = Unanswered()
        self._sender: Sender | None = None  # once the node named whom to pay
        self._closed = threading.Event()  # set by close(), or once the worker saw the connection end
        self.payer = None
        self.token = None
        self.welcome: dict = {}

    # --- connection -------------------------------------------------------------------

    def connect(self, timeout: float = 30) -> None:
        handshake = ClientHandshake(self.me, self.public_pem, self.eth_address,
                                    lambda data: crypto.sign(self.rsa_key, data))
        self.welcome = self._connection.open(handshake, timeout)
        threading.Thread(target=self._worker, name="worker", daemon=True).start()
        w3 = self._w3 or ethereum.connect(self.rpc_url)
        self.token, self.payer = payer_for(self.welcome, w3, self.rpc_url, self.eth_key, self.pay,
                                           self.expiry_seconds, self.book_size, self.client_dir / "books",
                                           self._announce_book)
        self._sender = Sender(self.me, self.rsa_key, self.payer, self._unanswered)

    def _announce_book(self, book) -> None:
        self._connection.post({"type": "book", "root": book.root.hex(),
                               "leaves": [leaf.hex() for leaf in book.leaf_hashes]})

    def close(self) -> None:
        self._closed.set()
        self._connection.close()

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    # Writes go through these two, so that a test can forge or capture frames.
    def _write(self, message: dict) -> None:
        self._write_raw(wire.encode(message))

    def _write_raw(self, data: bytes) -> None:
        self._connection.write_raw(data)

    @property
    def sock(self):
        return self._connection.sock

    @property
    def _send_lock(self) -> threading.Lock:
        return self._connection.write_lock

    # --- peers and their keys ---------------------------------------------------------

    def peer_key(self, name: str):
        """The peer's public key: from the node's directory, pinned here at first use.
        A changed key raises ClientError; the pin is never silently replaced."""
        return self._peer_keys.get([name])[name]

    def peer_keys(self, names: list[str]) -> dict:
        """peer_key for many names at once: every lookup goes out in one write."""
        return self._peer_keys.get(names)

    def _lookup(self, names: list[str]) -> dict:
        """name -> the PEM the node serves, or UnusableKey if it refused the key as weak."""
        replies = self._connection.request_all([{"type": "lookup", "name": name} for name in names],
                                               refusals=True)
        served = {}
        for name, reply in zip(names, replies):
            if reply["type"] != "error":
                served[name] = reply["public_key"]
            elif reply.get("code") == "weak_key":
                served[name] = UnusableKey(f"{reply.get('message')} (weak_key)")
            else:
                raise ClientError(f"{reply.get('message')} ({reply.get('code')})")
        return served

    def fingerprint(self, name: str) -> str:
        if name == self.me:
            return crypto.fingerprint(self.public_pem)
        return crypto.fingerprint(self.peer_key(name))

    def peers(self) -> list[str]:
        return self._connection.request({"type": "peers"})["names"]

    # --- channels ---------------------------------------------------------------------

    def join(self, channel: str) -> dict:
        return self._connection.request({"type": "join", "channel": channel})

    def leave(self, channel: str) -> dict:
        return self._connection.request({"type": "leave", "channel": channel})

    def channels(self) -> dict:
        return self._connection.request({"type": "channels"})

    # --- sending ----------------------------------------------------------------------

    def send_text(self, to: str, text: str) -> str:
        return self.send_many(to, [text])[0]

    def send_many(self, to: str, texts: list[str]) -> list[str]:
        """Encrypt, pay and send each text to `to`, in order."""
        for text in texts:
            check_length(text)
        key = self.peer_key(to)
        return self._send([(to, key, text) for text in texts])

    def send_to_channel(self, channel: str, text: str) -> tuple[list[str], list[str]]:
        """One copy per online member, each encrypted to that member and carrying its own
        bounty, all paid from the book. Returns (msg_ids sent, members offline). A member
        whose key is weak is skipped, and events.notice says so; the others still get theirs."""
        check_length(text)
        members = self._connection.request({"type": "members", "channel": channel})
        recipients = [m for m in members["online"] if m != self.me]
        keys, unusable = self._peer_keys.usable(recipients)
        for name, problem in unusable.items():  # told through the worker, like every notice
            self._connection.inbox.put({"type": NOTICE, "text": f"(not sent to {name} in {channel}: {problem})"})
        return self._send([(name, keys[name], text) for name in recipients if name in keys], channel), \
            members["offline"]

    def _send(self, copies: list[tuple[str, object, str]], channel: str | None = None) -> list[str]:
        msg_ids, frames = self._sender.prepare(copies, channel)
        if frames:
            self._write_raw(frames)
        return msg_ids

    @property
    def last_bounty(self) -> dict | None:
        return self._sender.last_bounty if self._sender else None

    @property
    def outstanding(self) -> dict[str, Outstanding]:
        """Sent messages without a receipt yet, by msg_id (guarded by `acked`)."""
        return self._unanswered.by_msg_id

    @property
    def acked(self) -> threading.Condition:
        return self._unanswered.changed

    def wait_acknowledged(self, timeout: float | None = None) -> bool:
        """Until every sent message got a receipt (or refusal)."""
        return self._unanswered.wait_until_empty(timeout, self._closed)

    def _settle(self, msg_id: str, status: str, detail: str = "") -> None:
        if self._unanswered.settle(msg_id):
            self.events.receipt(msg_id, status, detail)

    # --- what the node sends unasked: the worker thread -------------------------------

    def _worker(self) -> None:
        while True:
            try:  # wakes at least once a second to report keys the node withholds
                message = self._connection.inbox.get(timeout=min(1.0, self._receiver.release_timeout / 4))
            except queue.Empty:
                message = {"type": NOTICE, "text": None}
            for notice in self._receiver.overdue():
                self.events.notice(notice)
            kind = message["type"]
            try:
                if kind == CLOSED:
                    self._closed.set()
                    self._unanswered.wake()
                    if not self._connection.hung_up:
                        self.events.closed(message["reason"])
                    return
                if kind == NOTICE:
                    if message["text"] is not None:
                        self.events.notice(message["text"])
                elif kind == "deliver":
                    self._on_deliver(message)
                elif kind == "release":
                    incoming = self._receiver.release(message)
                    if incoming is not None:
                        self.events.message(incoming)
                elif kind == "receipt":
                    self._settle(message["msg_id"], message["status"])
                elif kind == "paid":
                    self.events.paid(message["msg_ids"])
                elif kind == "error":
                    self._on_error(message)
            except ClientError as exc:
                self.events.notice(str(exc))
            except Exception as exc:  # a bad frame from the node must not kill the client
                self.events.notice(f"could not handle a {kind!r} from the node: {exc}")

    def _on_error(self, message: dict) -> None:
        ref = message.get("ref")
        text = f"{message.get('message')} ({message.get('code')})"
        if ref and ref in self.outstanding:
            self._settle(ref, "refused", text)
        else:
            self.events.notice(f"node: {text}")

    def _on_deliver(self, message: dict) -> None:
        incoming, claim = self._receiver.deliver(message)
        if incoming is not None:  # not genuine: shown now, and its code not returned
            self.events.message(incoming)
        if claim is not None:
            self._write(claim)  # returning the code pays the node, and its `release` shows the text

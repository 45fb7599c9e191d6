"""A chat client without a terminal: connect, authenticate, pay, encrypt,
send; verify, decrypt, show, and return the code. client.py puts a terminal
on it; the tests drive it directly.
"""
from __future__ import annotations

import base64
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dm import datadir
from dm import crypto
from dm import wire
from dm.net import hang_up
from dm.chain import ethereum
from dm.client.payment import BookPayer, SinglePayer

PING_EVERY = 60  # keeps the node's idle timer from closing a quiet session


class ClientError(Exception):
    """A failure the user should read (no traceback)."""


# What fits in one frame once encrypted: base64 adds a third, plus the envelope's fields.
MAX_TEXT_BYTES = (wire.MAX_FRAME - 16_384) * 3 // 4


def check_length(text: str) -> None:
    """Refuse a message too long for one frame before anything is paid for it."""
    size = len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ClientError(f"that message is {size:,} bytes once encoded; the limit is {MAX_TEXT_BYTES:,} bytes "
                          "(about 6 MB): send it in parts")


@dataclass
class Incoming:
    sender: str
    text: str
    msg_id: str
    genuine: bool
    problem: str = ""  # why it is not genuine
    channel: str | None = None

    def line(self) -> str:
        """How a message is shown: [sender] text, or [#channel sender] text."""
        return f"[{self.channel} {self.sender}] {self.text}" if self.channel else f"[{self.sender}] {self.text}"


@dataclass
class Events:
    """Callbacks; each runs on the client's worker thread."""
    message: Callable[[Incoming], None] = lambda m: None
    receipt: Callable[[str, str, str], None] = lambda msg_id, status, detail: None  # delivered|offline|refused
    paid: Callable[[list[str]], None] = lambda msg_ids: None
    notice: Callable[[str], None] = lambda text: None
    closed: Callable[[str], None] = lambda reason: None


@dataclass
class Outstanding:
    to: str
    sent_at: float = field(default_factory=time.monotonic)


class ChatClient:
    def __init__(self, host: str, port: int, me: str, data_dir: Path, rpc_url: str = ethereum.DEFAULT_RPC_URL,
                 pay: str = "book", book_size: int = 100, expiry_seconds: int = 86_400, events: Events | None = None,
                 w3=None):
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
        self.peer_pins_path = self.client_dir / "peers.json"
        self.peer_pins: dict[str, str] = datadir.read_json(self.peer_pins_path, {})
        self._peer_keys: dict = {}  # verified this session
        self._pin_lock = threading.Lock()
        self.replay_guard = crypto.ReplayGuard()
        self.session_keys = crypto.SessionKeys()  # one RSA wrap per peer per 1,000 messages
        self.unwrap_cache = crypto.UnwrapCache()  # and one RSA unwrap on our side
        self.outstanding: dict[str, Outstanding] = {}
        self.acked = threading.Condition()
        self._send_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._replies: dict[tuple, queue.Queue] = {}
        self._closed = threading.Event()
        self._closing = False  # we hung up ourselves: no "connection lost" notice
        self.sock: socket.socket | None = None
        self.payer = None
        self.welcome: dict = {}

    # --- connection ---------------------------------------------------------------

    def connect(self, timeout: float = 30) -> None:
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise ClientError(f"cannot reach the node at {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        decoder = wire.MessageDecoder()
        self._write({"type": "hello", "name": self.me, "public_key": self.public_pem,
                     "eth_address": self.eth_address})
        challenge = self._read_one(decoder, "challenge")
        data = wire.auth_payload(challenge["nonce"], challenge["node_id"], self.me, self.public_pem,
                                     self.eth_address)
        self._write({"type": "auth", "signature": base64.b64encode(crypto.sign(self.rsa_key, data)).decode()})
        self.welcome = self._read_one(decoder, "welcome")
        self.sock.settimeout(None)
        threading.Thread(target=self._reader, args=(decoder,), name="reader", daemon=True).start()
        threading.Thread(target=self._worker, name="worker", daemon=True).start()
        threading.Thread(target=self._pinger, name="pinger", daemon=True).start()
        self._setup_payment()

    def _read_one(self, decoder: wire.MessageDecoder, expected: str) -> dict:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                raise ClientError(f"the node did not answer: {exc}") from None
            if not data:
                raise ClientError("the node closed the connection during the handshake")
            messages = decoder.feed_messages(data)
            if messages:
                message = messages[0]
                if message["type"] == "error":
                    raise ClientError(f"the node refused us: {message.get('message')} ({message.get('code')})")
                if message["type"] != expected:
                    raise ClientError(f"unexpected {message['type']!r} from the node during the handshake")
                return message

    def _setup_payment(self) -> None:
        """Pay only into the contract the node names, and only if it really is BountyToken."""
        w3 = self._w3 or ethereum.connect(self.rpc_url)
        try:
            chain_id = w3.eth.chain_id
        except Exception as exc:
            raise ClientError(f"cannot reach the chain at {self.rpc_url}: {exc}") from None
        if chain_id != self.welcome["chain_id"]:
            raise ClientError(f"the node is paid on chain {self.welcome['chain_id']} but {self.rpc_url} "
                              f"is chain {chain_id}")
        token = ethereum.BountyToken(w3, self.welcome["contract"])
        if not token.is_genuine():
            raise ClientError(f"the code at {token.address} is not BountyToken: refusing to pay into it")
        self.token = token
        signer = ethereum.Signer(w3, self.eth_key)
        relayer = self.welcome["node_eth_address"]
        if self.pay == "single":
            self.payer = SinglePayer(token, signer, relayer, self.expiry_seconds)
        else:
            self.payer = BookPayer(token, signer, relayer, self.expiry_seconds, self.book_size,
                                   self.client_dir / "books", self._announce_book)

    def _announce_book(self, book) -> None:
        self._write({"type": "book", "root": book.root.hex(), "leaves": [leaf.hex() for leaf in book.leaf_hashes]})

    def close(self) -> None:
        self._closing = True
        self._closed.set()
        if self.sock is not None:
            hang_up(self.sock)
            self.sock.close()

    def _write(self, message: dict) -> None:
        self._write_raw(wire.encode(message))

    def _write_raw(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ClientError(f"lost the connection to the node: {exc}") from None

    def _reader(self, decoder: wire.MessageDecoder) -> None:
        reason = "the node closed the connection"
        try:
            while True:
                data = self.sock.recv(262144)
                if not data:
                    break
                for payload in decoder.feed(data):
                    try:
                        message = wire.parse(payload)
                    except wire.ProtocolError as exc:  # one bad frame (e.g. a garbled deliver) is skipped
                        self._inbox.put({"type": "error", "code": exc.code, "message": f"skipped a frame: {exc}"})
                        continue
                    kind = message["type"]
                    if kind == "error" and message.get("ref") is not None:
                        waiting = [k for k in list(self._replies) if k[1] == message["ref"]]
                        if waiting:
                            self._replies.pop(waiting[0]).put(message)
                            continue
                    if kind in ("lookup", "peers", "book", "pong", "channels", "members"):
                        key = (kind, message.get("name") or message.get("root") or message.get("channel"))
                        waiter = self._replies.pop(key, None) or self._replies.pop((kind, None), None)
                        if waiter is not None:
                            waiter.put(message)
                            continue
                    self._inbox.put(message)
        except (OSError, wire.ProtocolError) as exc:
            if not self._closed.is_set():
                reason = f"connection lost: {exc}"
        finally:
            self._inbox.put({"type": "_closed", "reason": reason})

    def _pinger(self) -> None:
        while not self._closed.wait(PING_EVERY):
            try:
                self._write({"type": "ping"})
            except ClientError:
                return

    def _request(self, message: dict, reply_type: str, key=None, timeout: float = 10) -> dict:
        waiter: queue.Queue = queue.Queue()
        self._replies[(reply_type, key)] = waiter
        self._write(message)
        try:
            reply = waiter.get(timeout=timeout)
        except queue.Empty:
            self._replies.pop((reply_type, key), None)
            raise ClientError(f"the node did not answer our {message['type']!r}") from None
        if reply["type"] == "error":
            raise ClientError(f"{reply.get('message')} ({reply.get('code')})")
        return reply

    # --- peers' keys ---------------------------------------------------------------------

    def peer_key(self, name: str):
        """The peer's public key: from the node's directory, pinned here at first use.
        A changed key raises ClientError; the pin is never silently replaced."""
        return self.peer_keys([name])[name]

    def peer_keys(self, names: list[str]) -> dict:
        """peer_key for many names at once: every lookup goes out in one write and the
        pins file is written once (a channel's first message may meet 1,000 new names)."""
        with self._pin_lock:
            missing = [n for n in dict.fromkeys(names) if n not in self._peer_keys]
            if missing:
                waiters = {}
                for name in missing:
                    waiters[name] = queue.Queue()
                    self._replies[("lookup", name)] = waiters[name]
                self._write_raw(b"".join(wire.encode({"type": "lookup", "name": n}) for n in missing))
                served = {}
                for name in missing:
                    try:
                        reply = waiters[name].get(timeout=10)
                    except queue.Empty:
                        self._replies.pop(("lookup", name), None)
                        raise ClientError(f"the node did not answer our lookup of {name}") from None
                    if reply["type"] == "error":
                        raise ClientError(f"{reply.get('message')} ({reply.get('code')})")
                    served[name] = reply["public_key"]
                changed = False
                for name, pem in served.items():
                    self._check_pin(name, pem)
                    if name not in self.peer_pins:
                        self.peer_pins[name] = pem
                        changed = True
                    self._peer_keys[name] = crypto.public_key_from_pem(pem)
                if changed:
                    datadir.write_json(self.peer_pins_path, self.peer_pins)
            return {n: self._peer_keys[n] for n in names}

    def _check_pin(self, name: str, served: str) -> None:
        pinned = self.peer_pins.get(name)
        local = datadir.public_key_path(self.data_dir, name)
        if pinned is None and local.exists():  # the original's shared key files
            pinned = local.read_text()
        if pinned is not None and pinned.strip() != served.strip():
            raise ClientError(
                f"WARNING: the key for {name} has CHANGED (pinned {crypto.fingerprint(pinned)}, node now serves "
                f"{crypto.fingerprint(served)}). Someone may be impersonating {name}. Compare fingerprints "
                f"out of band; if the change is genuine, remove {name} from {self.peer_pins_path}.")

    def fingerprint(self, name: str) -> str:
        if name == self.me:
            return crypto.fingerprint(self.public_pem)
        return crypto.fingerprint(self.peer_key(name))

    def peers(self) -> list[str]:
        return self._request({"type": "peers"}, "peers")["names"]

    # --- sending --------------------------------------------------------------------------

    def send_text(self, to: str, text: str) -> str:
        return self.send_many(to, [text])[0]

    def send_many(self, to: str, texts: list[str]) -> list[str]:
        """Encrypt, pay and send each text to `to`, in order. One RSA signature covers
        the whole batch (crypto.seal_many), so piped input is not bound by RSA."""
        for text in texts:
            check_length(text)
        recipient_key = self.peer_key(to)
        try:
            bounties = self.payer.next_bounties(len(texts))
        except ethereum.ChainError as exc:
            raise ClientError(f"paying the bounty failed: {exc}") from None
        envelopes = crypto.seal_many(
            [({"text": text, "code": bounty.code.hex()}, to, recipient_key) for text, bounty in zip(texts, bounties)],
            sender=self.me, sender_key=self.rsa_key, session_keys=self.session_keys)
        frames = []
        with self.acked:
            for bounty, envelope in zip(bounties, envelopes):
                self.outstanding[envelope["msg_id"]] = Outstanding(to)
                frames.append(wire.encode({"type": "send", "to": to, "msg_id": envelope["msg_id"],
                                               "bounty": bounty.wire, "envelope": envelope}))
        self.last_bounty = bounties[-1].wire
        self._write_raw(b"".join(frames))
        return [e["msg_id"] for e in envelopes]

    # --- channels ---------------------------------------------------------------------

    def join(self, channel: str) -> dict:
        return self._request({"type": "join", "channel": channel}, "channels", channel)

    def leave(self, channel: str) -> dict:
        return self._request({"type": "leave", "channel": channel}, "channels", channel)

    def channels(self) -> dict:
        return self._request({"type": "channels"}, "channels")

    def send_to_channel(self, channel: str, text: str) -> tuple[list[str], list[str]]:
        """One copy per online member, each encrypted to that member and carrying its own
        bounty, all paid from the book. Returns (msg_ids sent, members offline)."""
        check_length(text)
        members = self._request({"type": "members", "channel": channel}, "members", channel)
        recipients = [m for m in members["online"] if m != self.me]
        keys = self.peer_keys(recipients)
        try:
            bounties = self.payer.next_bounties(len(recipients)) if recipients else []
        except ethereum.ChainError as exc:
            raise ClientError(f"paying the bounties failed: {exc}") from None
        envelopes = crypto.seal_many(
            [({"text": text, "code": b.code.hex(), "channel": channel}, name, keys[name])
             for name, b in zip(recipients, bounties)], sender=self.me, sender_key=self.rsa_key,
            session_keys=self.session_keys) if recipients else []
        frames = []
        with self.acked:
            for name, bounty, envelope in zip(recipients, bounties, envelopes):
                self.outstanding[envelope["msg_id"]] = Outstanding(name)
                # Canonical key order (type, to, msg_id, bounty, channel, envelope): the node's fast path.
                frames.append(wire.encode({"type": "send", "to": name, "msg_id": envelope["msg_id"],
                                               "bounty": bounty.wire, "channel": channel, "envelope": envelope}))
        self._write_raw(b"".join(frames))
        return [e["msg_id"] for e in envelopes], members["offline"]

    def wait_acknowledged(self, timeout: float | None = None) -> bool:
        """Until every sent message got a receipt (or refusal)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.acked:
            while self.outstanding and not self._closed.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.acked.wait(remaining if remaining is not None else 1)
            return not self.outstanding

    def _settle(self, msg_id: str, status: str, detail: str = "") -> None:
        with self.acked:
            if self.outstanding.pop(msg_id, None) is None:
                return
            self.acked.notify_all()
        self.events.receipt(msg_id, status, detail)

    # --- receiving -------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            message = self._inbox.get()
            kind = message["type"]
            try:
                if kind == "_closed":
                    self._closed.set()
                    with self.acked:
                        self.acked.notify_all()
                    if not self._closing:
                        self.events.closed(message["reason"])
                    return
                if kind == "deliver":
                    self._on_deliver(message)
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
        sender, envelope = message["from"], message["envelope"]
        try:
            sender_key = self.peer_key(sender)
            if envelope.get("from") != sender:
                raise crypto.MalformedEnvelope("the envelope's sender is not the one the node authenticated")
            if envelope.get("msg_id") != message["msg_id"]:
                raise crypto.MalformedEnvelope("the envelope's id differs from the one the node relayed")
            payload = crypto.open_envelope(envelope, recipient=self.me, recipient_key=self.rsa_key,
                                              sender_public_key=sender_key, replay_guard=self.replay_guard,
                                              unwrap_cache=self.unwrap_cache)
        except (crypto.EnvelopeError, ClientError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self.events.message(Incoming(sender, "", message["msg_id"], False, reason))
            return
        text, code = payload.get("text"), payload.get("code")
        channel = message.get("channel")
        if not isinstance(text, str) or not isinstance(code, str):
            self.events.message(Incoming(sender, "", message["msg_id"], False, "the message has no text or code"))
            return
        if payload.get("channel") != channel:  # the label is signed inside; the node cannot move a message
            self.events.message(Incoming(sender, "", message["msg_id"], False,
                                         "the message was relabelled to another channel", channel))
            return
        self.events.message(Incoming(sender, text, message["msg_id"], True, channel=channel))
        # Returning the code is what pays the node for this delivery.
        self._write({"type": "claim", "msg_id": message["msg_id"], "code": code})

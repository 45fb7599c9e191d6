"""A chat client without a terminal: connect, authenticate, pay, encrypt,
send; verify, decrypt, show, and return the code. client.py puts a terminal
on it; the tests drive it directly.

ChatClient composes one part per concern: the connection (socket, handshake,
requests by id), the peers' pinned keys, payment, sending, the outbox on disk,
and receiving. It survives the node going away: every message waits in the
outbox until the node answers it, the client reconnects by itself (with backoff,
trying each node address in turn) and sends again what is unanswered, and a
message for an offline peer waits until the node says the peer came online.
"""
from __future__ import annotations

import collections
import queue
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dm import crypto, datadir, wire
from dm.chain import ethereum
from dm.client import rpc
from dm.client.awaiting import AwaitingLog
from dm.client.connection import CLOSED, RECONNECT_FOR, RECONNECT_MAX_DELAY, Connection, NodeUnreachable
from dm.client.errors import ClientError, NotConnected
from dm.client.keyfiles import KeyFileProblem, load_keys
from dm.client.outbox import Outbox, Queued
from dm.client.payment import payer_for
from dm.client.peers import PeerKeys, UnusableKey
from dm.client.receiving import RELEASE_TIMEOUT, Incoming, Receiver
from dm.client.sending import MAX_TEXT_BYTES, Outstanding, Sender, Unanswered, check_length

RECONNECT_FIRST_DELAY = 0.25
WRITE_CHUNK = 1 << 20  # resent frames go out in writes of about this many bytes
SHOWN_MEMORY = 100_000  # (sender, msg_id) -> bounty of messages shown, to drop a resent copy quietly
# A send refused with unclaimed_limit (the recipient, or we, have --max-unclaimed deliveries
# waiting for their codes) is back-pressure, not a failure: it waits this long, then goes again
# with the same msg_id and bounty (nothing was reserved for it).
BACKPRESSURE_RETRY = 0.5
# Refusals after which trying again cannot help: someone else logged in with our name.
_FINAL_CODES = {"name_in_use", "name_taken", "auth_failed", "name_confusable", "weak_key", "invalid_name"}
from dm.wire.handshake import ClientHandshake

NOTICE = "_notice"  # put on the inbox by the client itself: {"type": NOTICE, "text": ...}
_NOT_CONNECTED = "not connected to the node: restart the client (queued messages go out then)"
_RESEND_ALL = "_resend_all"  # put on the inbox by connect(): send the outbox of an earlier run
_CLAIM_STORED = "_claim_stored"  # put on the inbox by connect(): claim again what an earlier run claimed

__all__ = ["ChatClient", "ClientError", "Events", "Incoming", "KeyFileProblem", "MAX_TEXT_BYTES", "Outstanding",
           "Queued", "check_length"]


@dataclass
class Events:
    """Callbacks; each runs on the client's worker thread."""
    message: Callable[[Incoming], None] = lambda m: None
    receipt: Callable[[str, str, str], None] = lambda msg_id, status, detail: None  # delivered|offline|refused
    paid: Callable[[list[str]], None] = lambda msg_ids: None
    notice: Callable[[str], None] = lambda text: None
    closed: Callable[[str], None] = lambda reason: None  # for good: given up, or replaced elsewhere
    # "lost" (once per outage, detail: why), "reconnecting" (detail: "N queued"),
    # "reconnected" (detail: host:port), "gave_up" (detail: why, and what to do)
    connection: Callable[[str, str], None] = lambda state, detail: None
    presence: Callable[[str, bool], None] = lambda name, online: None
    membership: Callable[[str, str, bool], None] = lambda channel, name, joined: None
    queued: Callable[[str, str], None] = lambda msg_id, peer: None  # the peer is offline: it waits for them


class ChatClient:
    """One user's session with a node, kept alive across the node going away.

    Thread-safety: any thread may call the public methods. Each part guards its own
    state (see their docstrings): the Connection its writes and waiting requests,
    PeerKeys the pins, Unanswered the sent messages, the Outbox its entries and file,
    the payer its book. One worker thread handles everything the node sends unasked,
    in order, and is the only thread that runs the Events callbacks and the Receiver,
    reconnects, and replaces `_connection` (other threads read it as it is: a write to a
    connection that just died fails, and its message waits in the outbox). `_state` is a
    plain string written by the worker and close(), read by anyone. connect()
    sets `welcome`, `payer` and the sender once, before any other call needs them.
    """

    def __init__(self, host: str | None = None, port: int | None = None, me: str = "", data_dir: Path | None = None,
                 rpc_url: str = ethereum.DEFAULT_RPC_URL, pay: str = "book", book_size: int = 100,
                 expiry_seconds: int = 86_400, events: Events | None = None, w3=None, *,
                 addresses: list[tuple[str, int]] | None = None, reconnect_for: float = RECONNECT_FOR,
                 reconnect_max_delay: float = RECONNECT_MAX_DELAY, release_timeout: float = RELEASE_TIMEOUT,
                 chain_timeout: float = rpc.CHAIN_TIMEOUT):
        self.addresses = [(h, int(p)) for h, p in (addresses or [])]
        if host is not None and (host, port) not in self.addresses:
            self.addresses.insert(0, (host, int(port)))
        if not self.addresses:
            raise ClientError("no node address given: pass host and port, or addresses")
        self.host, self.port = self.addresses[0]
        self.me, self.data_dir = datadir.check_name(me), data_dir
        self.rpc_url, self.pay, self.book_size, self.expiry_seconds = rpc_url, pay, book_size, expiry_seconds
        self.reconnect_for, self.reconnect_max_delay = reconnect_for, reconnect_max_delay
        self.events = events or Events()
        self._w3 = w3  # given (tests: eth-tester), or made by connect() with chain_timeout per request
        self.chain_timeout = chain_timeout
        self.chain_watch = rpc.ChainWatch()  # the requests to our own chain connection in flight
        self.rsa_key, self.eth_key = load_keys(data_dir, self.me)  # or KeyFileProblem, which names the file
        self.public_pem = crypto.public_key_pem(self.rsa_key)
        self.eth_address = ethereum.address_of(self.eth_key)
        self.client_dir = datadir.client_dir(data_dir, me)
        (self.client_dir / "books").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._inbox = queue.Queue()  # every connection's reader feeds this one worker
        self._connection = Connection(self.host, self.port, self._inbox)
        self._peer_keys = PeerKeys(data_dir, self.client_dir / "peers.json", self._lookup)
        self._receiver = Receiver(self.me, self.rsa_key, self.peer_key, release_timeout,
                                  store=AwaitingLog(self.client_dir / "awaiting.jsonl"))
        self._unanswered = Unanswered()
        self._outbox = Outbox(self.client_dir / "outbox.journal")
        self._sender: Sender | None = None  # once the node named whom to pay
        self._closed = threading.Event()  # set by close(), or once the client gave up
        self._state = "closed"
        self._final: str | None = None  # why the node ended the session for good (e.g. name_in_use)
        self.final_code: str | None = None  # and its code, for the user's next step
        self._waiting_for: set[str] = set()  # peers that messages wait for (worker thread only)
        self._shown: collections.OrderedDict = collections.OrderedDict()  # (sender, msg_id) -> bounty; worker only
        self._held_back: collections.OrderedDict[str, float] = collections.OrderedDict()  # msg_id -> resend at; worker only
        self.payer = None
        self.token = None
        self.welcome: dict = {}

    # --- connection -------------------------------------------------------------------

    def connect(self, timeout: float = 30) -> None:
        """Connects to the first node address that answers (each is tried once), starts the
        worker, sets up payment, and sends again whatever the outbox kept from an earlier run."""
        problems = []
        for host, port in self.addresses:
            try:
                self.welcome = self._open(host, port, timeout)
                break
            except NodeUnreachable as exc:
                problems.append(str(exc))
        else:
            raise ClientError(problems[0] if len(problems) == 1 else "no node answered: " + "; ".join(problems))
        self._state = "connected"
        threading.Thread(target=self._worker, name="worker", daemon=True).start()
        w3 = self._w3 or rpc.connect(self.rpc_url, self.chain_timeout, self.chain_watch)
        self.token, self.payer = payer_for(self.welcome, w3, self.rpc_url, self.eth_key, self.pay,
                                           self.expiry_seconds, self.book_size, self.client_dir / "books",
                                           self._announce_book)
        self._sender = Sender(self.me, self.rsa_key, self.payer, self._unanswered)
        self._inbox.put({"type": _CLAIM_STORED})  # claims whose key never came to an earlier run
        if len(self._outbox):  # from an earlier run: through the worker, like every resend
            self._inbox.put({"type": _RESEND_ALL})

    def _open(self, host: str, port: int, timeout: float) -> dict:
        """A new authenticated connection to host:port, which becomes the client's connection."""
        handshake = ClientHandshake(self.me, self.public_pem, self.eth_address,
                                    lambda data: crypto.sign(self.rsa_key, data))
        connection = Connection(host, port, self._inbox)
        welcome = connection.open(handshake, timeout)
        self._connection, self.host, self.port = connection, host, port
        return welcome

    def _announce_book(self, book) -> None:
        try:
            self._connection.post({"type": "book", "root": book.root.hex(),
                                   "leaves": [leaf.hex() for leaf in book.leaf_hashes]})
        except ClientError:
            pass  # not connected: every reconnect announces the current book again

    def close(self) -> None:
        self._closed.set()  # no send starts from now on
        self._state = "closed"
        self._connection.close()
        self._outbox.close()
        self._receiver.close()
        if hasattr(self.payer, "close"):
            self.payer.close()  # the book's real cursor, not the crash margin

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def connection_state(self) -> str:
        """"connected", "reconnecting" (the node went away; trying again), or "closed"."""
        return self._state

    @property
    def _live(self) -> Connection:
        """The connection, for a request that needs an answer now; ClientError while there is none."""
        if self._closed.is_set():
            raise ClientError(_NOT_CONNECTED)
        if self._state == "reconnecting":
            raise NotConnected("the node is away and the client is reconnecting: try again in a moment "
                              "(messages you send meanwhile are queued)")
        return self._connection

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
        replies = self._live.request_all([{"type": "lookup", "name": name} for name in names],
                                               refusals=True)
        served = {}
        for name, reply in zip(names, replies):
            if reply["type"] != "error":
                served[name] = reply["public_key"]
            elif reply.get("code") == "weak_key":
                served[name] = UnusableKey(f"{reply.get('message')} (weak_key)")
            elif reply.get("code") == "closed":  # the connection dropped while we asked
                raise NotConnected(f"{reply.get('message')}: the node is away")
            else:
                raise ClientError(f"{reply.get('message')} ({reply.get('code')})")
        return served

    def fingerprint(self, name: str) -> str:
        if name == self.me:
            return crypto.fingerprint(self.public_pem)
        return crypto.fingerprint(self.peer_key(name))

    def peers(self) -> list[str]:
        return self._live.request({"type": "peers"})["names"]

    # --- channels ---------------------------------------------------------------------

    def join(self, channel: str) -> dict:
        return self._live.request({"type": "join", "channel": channel})

    def leave(self, channel: str) -> dict:
        return self._live.request({"type": "leave", "channel": channel})

    def channels(self) -> dict:
        return self._live.request({"type": "channels"})

    def members(self, channel: str) -> dict:
        """{"online": [...], "offline": [...]} of a channel we are in (Refused not_a_member otherwise)."""
        return self._live.request({"type": "members", "channel": channel})

    # --- sending ----------------------------------------------------------------------

    def send_text(self, to: str, text: str) -> str:
        return self.send_many(to, [text])[0]

    def send_many(self, to: str, texts: list[str]) -> list[str]:
        """Encrypt, pay and send each text to `to`, in order."""
        for text in texts:
            check_length(text)
        if self._closed.is_set():
            raise ClientError(_NOT_CONNECTED)
        key = self.peer_key(to)
        return self._send([(to, key, text) for text in texts])

    def send_to_channel(self, channel: str, text: str) -> tuple[list[str], list[str]]:
        """One copy per online member, each encrypted to that member and carrying its own
        bounty, all paid from the book. Returns (msg_ids sent, members offline). A member
        whose key is weak is skipped, and events.notice says so; the others still get theirs."""
        check_length(text)
        members = self.members(channel)
        recipients = [m for m in members["online"] if m != self.me]
        keys, unusable = self._peer_keys.usable(recipients)
        for name, problem in unusable.items():  # told through the worker, like every notice
            self._inbox.put({"type": NOTICE, "text": f"(not sent to {name} in {channel}: {problem})"})
        return self._send([(name, keys[name], text) for name in recipients if name in keys], channel), \
            members["offline"]

    def _send(self, copies: list[tuple[str, object, str]], channel: str | None = None) -> list[str]:
        """Pay and seal the copies, keep them in the outbox on disk, then write them. While the
        node is away they simply wait there, and go out once the client has reconnected."""
        if self._closed.is_set():
            raise ClientError(_NOT_CONNECTED)
        entries = self._sender.prepare(copies, channel)
        if entries:
            try:
                self._outbox.add(entries)
            except OSError as exc:  # not kept, so not sent: their bounties stay unspent
                for entry in entries:
                    self._unanswered.settle(entry.msg_id)
                raise ClientError(f"could not keep the message in {self._outbox.path}: {exc.strerror or exc}; "
                                  "free some disk space, then send it again") from None
            try:
                self._write_raw(b"".join(entry.frame for entry in entries))
            except ClientError:
                pass  # the connection just died: the worker reconnects and sends them again
        return [entry.msg_id for entry in entries]

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
        """Until every sent message got a receipt (or refusal). Messages waiting for an offline
        peer do not count: they stay in the outbox, for this run or the next."""
        return self._unanswered.wait_until_empty(timeout, self._closed)

    def _settle(self, msg_id: str, status: str, detail: str = "") -> None:
        self._outbox.remove(msg_id)
        if self._unanswered.settle(msg_id):
            self.events.receipt(msg_id, status, detail)

    # --- the outbox -----------------------------------------------------------------------

    @property
    def outbox_path(self) -> Path:
        return self._outbox.path

    def queue(self) -> list[Queued]:
        """Every message not yet acknowledged, oldest first: .index (from 1, for drop()),
        .msg_id, .to, .text, .since (wall-clock time it was first sent), .waiting (for an
        offline peer)."""
        return self._outbox.listing()

    def drop(self, index: int) -> bool:
        """Forget the queued message at `index` (as queue() numbers them); False if there is
        none. Its bounty stays unspent unless the node had already delivered it."""
        entries = self._outbox.listing()
        if not 1 <= index <= len(entries):
            return False
        msg_id = entries[index - 1].msg_id
        self._outbox.remove(msg_id)
        self._outbox.compact()
        self._unanswered.settle(msg_id)
        return True

    def _resend(self, entries: list[Queued]) -> None:
        """Write these outbox entries again, as they were first written (same msg_id, same bounty)."""
        if not entries:
            return
        self._unanswered.track(entries)
        chunk: list[bytes] = []
        size = 0
        try:
            for entry in entries:
                chunk.append(entry.frame)
                size += len(entry.frame)
                if size >= WRITE_CHUNK:
                    self._write_raw(b"".join(chunk))
                    chunk, size = [], 0
            if chunk:
                self._write_raw(b"".join(chunk))
        except ClientError:
            pass  # lost again: the next reconnect sends them

    def _on_receipt(self, msg_id: str, status: str) -> None:
        entry = self._outbox.get(msg_id)
        if status != "offline" or entry is None or entry.channel is not None:
            self._settle(msg_id, status)
            return
        # A message to an offline peer waits in the outbox until the node says they came.
        self._unanswered.settle(msg_id)
        if self._outbox.mark_waiting(msg_id) is None:
            return
        self.events.queued(msg_id, entry.to)
        if entry.to not in self._waiting_for:  # the reply says if they came in the meantime
            self._waiting_for.add(entry.to)
            self._post({"type": "watch", "names": [entry.to]})

    def _peer_online(self, name: str) -> None:
        self._waiting_for.discard(name)
        self._resend(self._outbox.take_waiting(name))

    def _post(self, message: dict) -> None:
        try:
            self._connection.post(message)
        except ClientError:
            pass  # the worker reconnects, and watches again

    # --- what the node sends unasked: the worker thread -------------------------------

    def _worker(self) -> None:
        while True:
            try:  # wakes at least once a second to report keys the node withholds
                wait = min(1.0, self._receiver.release_timeout / 4, BACKPRESSURE_RETRY if self._held_back else 1.0)
                message = self._inbox.get(timeout=wait)
            except queue.Empty:
                message = {"type": NOTICE, "text": None}
            for notice in self._receiver.overdue():
                self.events.notice(notice)
            self._resend_held_back()
            kind = message["type"]
            try:
                if kind == CLOSED:
                    if message["connection"] is not self._connection:
                        continue  # an older connection, already replaced
                    if not self._connection_ended(message["reason"]):
                        return
                elif kind == _CLAIM_STORED:
                    if self._receiver.restore():
                        self._claim_again()
                elif kind == _RESEND_ALL:
                    self._announce_books()
                    self._resend(self._outbox.take_waiting())
                elif kind == NOTICE:
                    if message["text"] is not None:
                        self.events.notice(message["text"])
                elif kind == "deliver":
                    self._on_deliver(message)
                elif kind == "release":
                    incoming = self._receiver.release(message)
                    if incoming is not None:
                        self.events.message(incoming)
                elif kind == "receipt":
                    self._on_receipt(message["msg_id"], message["status"])
                elif kind == "paid":
                    self.events.paid(message["msg_ids"])
                elif kind == "presence":
                    self.events.presence(message["name"], message["online"] is True)
                    if message["online"] is True:
                        self._peer_online(message["name"])
                elif kind == "membership":
                    self.events.membership(message["channel"], message["name"], message["joined"] is True)
                elif kind == "watch":  # the answer to a watch we posted: who is online right now
                    for name in message.get("online", []):
                        self._peer_online(name)
                elif kind == "error":
                    self._on_error(message)
            except ClientError as exc:
                self.events.notice(str(exc))
            except Exception as exc:  # a bad frame from the node must not kill the client
                self.events.notice(f"could not handle a {kind!r} from the node: {exc}")
            if self._inbox.empty():
                self._outbox.flush_answered()  # idle: the answers so far go to disk in one write

    # --- the node went away: the worker thread ----------------------------------------

    def _connection_ended(self, reason: str) -> bool:
        """The current connection ended. True once the client is connected again; False when
        it is over (closed by us, replaced elsewhere, reconnecting off, or given up)."""
        if self._closed.is_set():
            self._state = "closed"
            self._unanswered.wake()
            return False
        if self._final is not None or self.reconnect_for <= 0:
            self._end(self._final or reason)
            return False
        self._state = "reconnecting"
        self.events.connection("lost", reason)
        self.events.connection("reconnecting", f"{len(self._outbox)} queued")
        problem = self._reconnect()
        if problem is not None:
            if not self._closed.is_set():
                self.events.connection("gave_up", problem)
                self._end(problem)
            return False
        if self._closed.is_set():  # close() came while the new connection was opening
            self._connection.close()
            return False
        self._state = "connected"
        self.events.connection("reconnected", f"{self.host}:{self.port}")
        self._announce_books()
        self._waiting_for = {entry.to for entry in self._outbox.listing() if entry.waiting}
        if self._waiting_for:
            self._post({"type": "watch", "names": sorted(self._waiting_for)})
        self._claim_again()
        self._resend(self._outbox.take_waiting())  # everything unanswered, with its msg_id and bounty
        return True

    def _announce_books(self) -> None:
        """Before the outbox goes again: the books that pay for its messages (any of them may
        have been opened while the node was away), and the current one."""
        announce_again = getattr(self.payer, "announce_again", None)  # a BookPayer's
        if announce_again is not None:
            announce_again({root for entry in self._outbox.listing() if (root := _book_root(entry.frame))})

    def _claim_again(self) -> None:
        """Claims whose key did not come before the connection ended go again: the node answers
        its recipient's repeated claim with the same key, and is paid once."""
        claims = self._receiver.reclaims()
        if claims:
            try:
                self._write_raw(b"".join(wire.encode(claim) for claim in claims))
            except ClientError:
                pass  # lost again: the next reconnect claims them again

    def _reconnect(self) -> str | None:
        """Tries every address in turn, pausing between rounds (doubling up to the maximum, with
        jitter, so that many clients do not return at once). None once connected; otherwise why not."""
        deadline = time.monotonic() + self.reconnect_for
        delay, last = min(RECONNECT_FIRST_DELAY, self.reconnect_max_delay), "no node answered"
        while not self._closed.is_set():
            for host, port in self.addresses:
                try:
                    welcome = self._open(host, port, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                except NodeUnreachable as exc:
                    last = str(exc)
                    continue
                except ClientError as exc:  # refused for good (e.g. our name is now someone else's key)
                    return f"{exc}: not trying again"
                if welcome.get("node_eth_address") != self.welcome.get("node_eth_address"):
                    self.events.notice("(this node is paid by another account than the first: messages paid "
                                       "for the first node may be refused as unpaid)")
                return None
            pause = random.uniform(delay / 2, delay)
            if time.monotonic() + pause > deadline:
                break
            self._closed.wait(pause)
            delay = min(delay * 2, self.reconnect_max_delay)
        return (f"gave up reconnecting after {self.reconnect_for:g}s ({last}); {len(self._outbox)} message(s) "
                "stay queued on disk and go out when you restart the client")

    def _end(self, reason: str) -> None:
        self._state = "closed"
        self._closed.set()
        self._unanswered.wake()
        self.events.closed(reason)

    def _on_error(self, message: dict) -> None:
        ref = message.get("ref")
        text = f"{message.get('message')} ({message.get('code')})"
        if message.get("code") == "unclaimed_limit" and ref and self._outbox.get(ref) is not None:
            if not self._held_back:
                self.events.notice(f"(the node holds sends back: {message.get('message')}; "
                                   "they go again by themselves)")
            self._held_back[ref] = time.monotonic() + BACKPRESSURE_RETRY  # still unanswered: piped input waits
            return
        if message.get("code") in _FINAL_CODES:
            self._final, self.final_code = f"the node ended this session: {text}", message.get("code")
        if ref and (ref in self.outstanding or self._outbox.get(ref) is not None):
            if message.get("code") == "unpaid" and hasattr(self.payer, "drop_if_gone") and self.payer.drop_if_gone():
                self.events.notice("your prepaid book is no longer on the chain (was the chain reset or rolled "
                                   "back?): the next message opens a new one, so send that line again")
            self._settle(ref, "refused", text)
        elif ref and message.get("code") in ("unknown_message", "bad_code", "expired") and \
                (notice := self._receiver.refused(ref, text)) is not None:
            self.events.notice(notice)
        else:
            self.events.notice(f"node: {text}")

    def _resend_held_back(self) -> None:
        """Send again, oldest first, the messages refused with unclaimed_limit whose wait is over."""
        now, due = time.monotonic(), []
        for msg_id, at in list(self._held_back.items()):
            if at > now:
                break
            del self._held_back[msg_id]
            entry = self._outbox.get(msg_id)
            if entry is not None:
                due.append(entry)
        self._resend(due)

    def _on_deliver(self, message: dict) -> None:
        incoming, claim = self._receiver.deliver(message)
        key = (message["from"], message["msg_id"])
        if incoming is not None:  # not genuine: shown now, and its code not returned
            if self._shown.get(key) == message.get("bounty"):
                return  # the very message taken before, bounty and all: its sender resent it to a restarted node
            self.events.message(incoming)
        elif claim is not None:
            self._shown[key] = message.get("bounty")
            if len(self._shown) > SHOWN_MEMORY:
                self._shown.popitem(last=False)
        if claim is not None:
            self._write(claim)  # returning the code pays the node, and its `release` shows the text


_BOOK_ROOT = re.compile(rb'"bounty":\{"book":"([0-9a-f]{64})"')


def _book_root(frame: bytes) -> str | None:
    """The book (hex root) that pays for an outbox entry's `send`, None for a single bounty.
    Frames are the client's own, in canonical order (dm.client.sending)."""
    found = _BOOK_ROOT.search(frame, 0, 400)  # the bounty comes before the envelope
    return found.group(1).decode() if found else None

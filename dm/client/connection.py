"""The client's connection to its node: the socket, the handshake, one reader
thread, writes under one lock, a pinger, and requests matched to their replies
by request id. Whatever is not the reply to a waiting request goes to the
inbox, in arrival order, for the client's worker.
"""
from __future__ import annotations

import queue
import socket
import threading
import time

from dm import wire
from dm.client.errors import ClientError, NotConnected, Refused
from dm.net import hang_up
from dm.wire.handshake import ClientHandshake, HandshakeRefused

# Here, not in core.py, so that client.py --help reads them without importing web3.
RECONNECT_FOR = 600.0  # seconds of trying to reconnect before giving up (client.py --reconnect-for)
RECONNECT_MAX_DELAY = 5.0  # the longest pause between two rounds of tries (client.py --reconnect-max-delay)
RELEASE_TIMEOUT = 10.0  # seconds from our claim to the node's release before we report it (--release-timeout)

PING_EVERY = 60  # keeps the node's idle timer from closing a quiet session
REPLY_TIMEOUT = 10  # seconds a request waits for its reply
# Seconds the handshake waits for each answer from the node. A node gives a client this long to
# authenticate before it hangs up (node.py's handshake timeout), so waiting longer gains nothing;
# a program that is not a node and says nothing is told at this point.
HANDSHAKE_TIMEOUT = 10
CLOSED = "_closed"  # a connection's last message: {"type": CLOSED, "reason": text, "connection": it}

# Refusals the handshake words itself; the node's own get "the node refused us".
# (The node has no cause to send `out_of_order` to a client that follows the handshake.)
_HANDSHAKE_OWN_CODES = {"closed", "out_of_order"}
# Refusals that may go away by themselves: worth trying again after a pause.
_PASSING_CODES = {"busy", "timeout", "internal", "closed"}


class NodeUnreachable(ClientError):
    """No node answered at that address, or it turned us away for now (busy): try again later."""


class PendingRequests:
    """Requests waiting for their reply, by request id.

    Thread-safety: any thread may call any method; `_lock` guards the id counter and
    the table. A reply is handed over through its request's own queue, so nobody
    waits while holding the lock.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last_id = 0
        self._waiting: dict[int, queue.SimpleQueue] = {}

    def new_id(self) -> int:
        """An id for a request whose reply nobody waits for."""
        with self._lock:
            self._last_id += 1
            return self._last_id

    def open(self) -> tuple[int, queue.SimpleQueue]:
        """A fresh id, and the queue its reply will arrive on."""
        waiter: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._last_id += 1
            self._waiting[self._last_id] = waiter
            return self._last_id, waiter

    def answer(self, message: dict) -> bool:
        """Hands a reply to the request it answers; False when no request waits for its `req`."""
        req = message.get("req")
        if type(req) is not int:
            return False
        with self._lock:
            waiter = self._waiting.pop(req, None)
        if waiter is None:
            return False
        waiter.put(message)
        return True

    def forget(self, req: int) -> None:
        with self._lock:
            self._waiting.pop(req, None)

    def fail_all(self, reason: str) -> None:
        """The connection is gone: every waiting request gets a refusal now, not after its timeout."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.put({"type": "error", "code": "closed", "message": reason})


class Connection:
    """One authenticated session with the node.

    Thread-safety: `write_lock` serialises every write to the socket, from any thread.
    Only the reader thread reads the socket and fills `inbox`; only the client's worker
    empties it. `pending` has its own lock. open() sets `sock` once; close() may come
    from any thread.
    """

    def __init__(self, host: str, port: int, inbox: queue.Queue | None = None):
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.inbox: queue.Queue = inbox if inbox is not None else queue.Queue()
        self.pending = PendingRequests()
        self.write_lock = threading.Lock()
        self.hung_up = False  # we closed it ourselves: no "connection lost" notice
        self._stopped = threading.Event()

    def open(self, handshake: ClientHandshake, timeout: float = 30) -> dict:
        """Connects, proves our key, starts the reader and the pinger; returns the node's welcome."""
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise NodeUnreachable(f"cannot reach the node at {self.host}:{self.port}: {exc.strerror or exc}: "
                                  "start node.py first, or check the host and port") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(min(timeout, HANDSHAKE_TIMEOUT))
        try:
            self._shake_hands(handshake)
        except ClientError:
            self.close()
            raise
        self.sock.settimeout(None)
        for message in handshake.unread():  # frames that came in the welcome's read
            self._route(message)
        threading.Thread(target=self._reader, args=(handshake.decoder,), name="reader", daemon=True).start()
        threading.Thread(target=self._pinger, name="pinger", daemon=True).start()
        return handshake.welcome

    def _shake_hands(self, handshake: ClientHandshake) -> None:
        first = b""  # what came before the node's first answer: says what answered instead
        try:
            self.write_raw(handshake.hello())
            while not handshake.done:
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    waited = f"{self.sock.gettimeout():g}s"
                    if first:  # a node began, then went quiet
                        raise NodeUnreachable(f"the node did not finish the handshake within {waited}: "
                                              "it may be overloaded; try again in a moment") from None
                    raise NodeUnreachable(self._not_a_node(b"", f"nothing answered our greeting within "
                                                                  f"{waited}")) from None
                except OSError as exc:
                    raise NodeUnreachable(f"the node did not answer: {exc}") from None
                first = first or data
                answer = handshake.receive(data)
                if answer:
                    self.write_raw(answer)
        except HandshakeRefused as exc:
            error = NodeUnreachable if exc.code in _PASSING_CODES else ClientError
            if exc.code in _HANDSHAKE_OWN_CODES:
                raise error(exc.message) from None
            raise error(f"the node refused us: {exc.message} ({exc.code})") from None
        except wire.ProtocolError:  # a node's first frames are never broken: this is something else
            raise NodeUnreachable(self._not_a_node(first, "it answered with something else")) from None

    def _not_a_node(self, first: bytes, what: str) -> str:
        """Why host:port is not a node, and what to check."""
        hint = " (it speaks HTTP: is that the chain's port?)" if first.startswith(b"HTTP/") else ""
        return (f"{self.host}:{self.port} is not a DistributedMessaging node: {what}{hint}. Check the host and "
                "port: node.py listens on 12345 unless started with --port")

    def close(self) -> None:
        self.hung_up = True
        self._stopped.set()
        if self.sock is not None:
            hang_up(self.sock)
            self.sock.close()

    # --- writing ----------------------------------------------------------------------

    def write(self, message: dict) -> None:
        self.write_raw(wire.encode(message))

    def write_raw(self, data: bytes) -> None:
        with self.write_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise NotConnected(f"lost the connection to the node: {exc}") from None

    # --- requests ---------------------------------------------------------------------

    def post(self, message: dict) -> None:
        """Sends a request whose reply nobody waits for (the reply goes to the inbox)."""
        self.write({**message, "req": self.pending.new_id()})

    def request(self, message: dict, timeout: float = REPLY_TIMEOUT) -> dict:
        """Sends one request and returns its reply; a refusal or silence raises ClientError."""
        return self.request_all([message], timeout)[0]

    def request_all(self, messages: list[dict], timeout: float = REPLY_TIMEOUT,
                    refusals: bool = False) -> list[dict]:
        """Sends every request in one write, each under its own id, and returns their
        replies in the same order. Raises ClientError for the first refused request (unless
        `refusals`: then an `error` reply is returned in its place), or for the first one
        not answered within `timeout`."""
        opened = [self.pending.open() for _ in messages]
        try:
            self.write_raw(b"".join(wire.encode({**message, "req": req})
                                    for message, (req, _) in zip(messages, opened)))
            deadline = time.monotonic() + timeout
            replies = []
            for message, (_, waiter) in zip(messages, opened):
                try:
                    replies.append(waiter.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    raise ClientError(f"the node did not answer our {_described(message)}") from None
        finally:
            for req, _ in opened:
                self.pending.forget(req)
        for reply in replies:
            if reply["type"] == "error" and not refusals:
                raise Refused(reply.get("message"), reply.get("code"))
            reply.pop("req", None)  # the id was ours to match by, not part of the answer
        return replies

    # --- the reader and the pinger ----------------------------------------------------

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
                        self.inbox.put({"type": "error", "code": exc.code, "message": f"skipped a frame: {exc}"})
                        continue
                    self._route(message)
        except (OSError, wire.ProtocolError) as exc:
            if not self.hung_up:
                reason = f"connection lost: {exc}"
        finally:
            self._stopped.set()
            if not self.hung_up:  # (close() closes it itself)
                self.sock.close()
            self.pending.fail_all(reason)
            self.inbox.put({"type": CLOSED, "reason": reason, "connection": self})

    def _route(self, message: dict) -> None:
        if not self.pending.answer(message):
            self.inbox.put(message)

    def _pinger(self) -> None:
        while not self._stopped.wait(PING_EVERY):
            try:
                self.post({"type": "ping"})
            except ClientError:
                return


def _described(request: dict) -> str:
    """How a request is named when the node leaves it unanswered."""
    if request["type"] == "lookup":
        return f"lookup of {request['name']}"
    return repr(request["type"])

"""The thin threaded socket layer: accept, one thread per connection, and the watchdog.

Everything a connection's bytes mean is its Session's business (dm.relay.session); this
module only moves bytes, owns the set of live sessions, and closes what stalls.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

from dm import wire
from dm.net import hang_up
from dm.relay.connection import Connection, timeval
from dm.relay.session import Session

log = logging.getLogger("node")
RELAY_REPORT_SECONDS = 10  # how often the log sums up relaying
WATCHDOG_SECONDS = 0.25
# 256 KB per read: a larger recv() allocates (and the kernel zeroes) fresh pages
# every time, which made reads three times slower here.
RECV_SIZE = 262144
threading.stack_size(512 * 1024)  # thousands of connection threads; the default 8 MB stack is waste


class Server:
    """Listens, runs a thread per connection, and closes connections that stall.

    Thread-safety: `sessions` (every live session) is written by the accept loop and by
    connection threads as they end, always under `lock`; the watchdog copies it under `lock`.
    No file or chain I/O happens under `lock`."""

    def __init__(self, node, host: str, port: int, *, max_connections: int, handshake_timeout: float,
                 frame_timeout: float, idle_timeout: float, clock=time.monotonic):
        self.node = node
        self.clock = clock
        self.max_connections = max_connections
        self.handshake_timeout, self.frame_timeout, self.idle_timeout = handshake_timeout, frame_timeout, idle_timeout
        self.sessions: set[Session] = set()
        self.lock = threading.Lock()
        self.relayed_by_closed = 0  # relays counted by sessions that are gone
        self._stop = threading.Event()
        self.listener = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self.port = self.listener.getsockname()[1]

    def start(self) -> None:
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        hang_up(self.listener)  # wakes an accept() in progress; close() alone lets it take one more
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            session.transport.close()

    @property
    def relayed(self) -> int:
        """Messages relayed this run (each session counts its own: no shared counter to race on)."""
        with self.lock:
            return self.relayed_by_closed + sum(session.relayed for session in self.sessions)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, address = self.listener.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                # Out of file descriptors (or a connection reset before accept): wait, then go on.
                log.warning("accept failed: %s", exc)
                time.sleep(0.1)
                continue
            with self.lock:
                full = len(self.sessions) >= self.max_connections
            if full:
                try:
                    sock.sendall(wire.encode(wire.error("busy")))
                except OSError:
                    pass
                finally:
                    sock.close()
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A reader that stops reading must not block us forever: give up on it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(10))
            except OSError:
                sock.close()
                continue
            session = Session(self.node, Connection(sock, address), self.clock())
            with self.lock:
                stopping = self._stop.is_set()  # under the lock: stop() closes every session added before
                if not stopping:
                    self.sessions.add(session)
            if stopping:
                sock.close()
                return
            threading.Thread(target=self._serve, args=(session,), name="conn", daemon=True).start()

    def _serve(self, session: Session) -> None:
        transport, clock = session.transport, self.clock
        try:
            pause = session.pause_needed(clock())
            if pause:  # its address is over its CPU share: reconnecting does not skip the wait
                time.sleep(pause)
            while not transport.closed:
                try:
                    data = transport.sock.recv(RECV_SIZE)
                except OSError:
                    break
                if not data:
                    break
                session.receive(data, clock())
                if transport.has_posted:  # notices the socket had no room for when they came
                    transport.flush_posted()
                pause = session.pause_needed(clock())
                if pause:  # over its CPU share (dm.relay.budget): others go first
                    time.sleep(pause)
                session.answered(clock())
        finally:
            transport.close()
            try:
                transport.sock.close()
            except OSError:
                pass
            with self.lock:
                if session in self.sessions:
                    self.sessions.discard(session)
                    self.relayed_by_closed += session.relayed
            self.node.go_offline(session)

    def _watchdog(self) -> None:
        """Closes connections that stall (slow handshakes, half-sent frames, silence), forgets
        deliveries whose code never came back, and sums up relaying in the log."""
        reported, next_report = self.relayed, self.clock() + RELAY_REPORT_SECONDS
        while not self._stop.wait(WATCHDOG_SECONDS):
            now = self.clock()
            self.node.sweep(now)
            if now >= next_report:
                relayed = self.relayed
                if relayed != reported:
                    log.info("relayed %d message(s) in the last %gs, %d this run",
                             relayed - reported, RELAY_REPORT_SECONDS, relayed)
                reported, next_report = relayed, now + RELAY_REPORT_SECONDS
            with self.lock:
                sessions = list(self.sessions)
            for session in sessions:
                if session.transport.has_posted:
                    session.transport.flush_posted()
                reason = session.timeout_reason(now, self.handshake_timeout, self.frame_timeout,
                                                self.idle_timeout)
                if reason:
                    session.transport.abort(wire.error("timeout", reason))

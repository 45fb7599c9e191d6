"""One client connection's socket as the node sees it, with writes coalesced per burst."""
from __future__ import annotations

import socket
import struct
import threading

from dm import wire
from dm.net import hang_up

# While a connection thread handles the frames of one read, what it sends is
# collected here and written once per destination: one syscall per burst
# instead of one per frame.
burst = threading.local()


# What may wait for a connection that is not reading: notices (presence, membership, `paid`,
# name_in_use) from other threads, which never wait on its socket. Past it, it is closed.
MAX_POSTED = 1 << 20


class Connection:
    """One client's socket as the node writes to it: frames are coalesced per burst.

    Thread-safety: any thread may write (a sender's connection thread delivers to this
    one); every socket write, `_out` and `_tail` are under `_send_lock`. A delivery waits for
    the socket (up to SO_SNDTIMEO): that is the back-pressure on its sender. A notice from
    another thread (post) never waits on the socket: it goes into `_posted`, under
    `_posted_lock` (held for no I/O), and out after the frames queued before it, written by
    whoever holds `_send_lock` next or by flush_posted() (the owning thread after each read,
    the watchdog every tick). Only the owning connection thread reads the socket. `closed`
    only ever goes from False to True.
    """

    def __init__(self, sock: socket.socket, address):
        self.sock = sock
        self.address = address
        self.closed = False
        self._send_lock = threading.RLock()  # close() takes it too, from inside a failed write
        self._out: list[bytes] = []
        self._tail = b""  # what a write that could not wait left of its bytes: it goes first
        self._posted_lock = threading.Lock()
        self._posted: list[bytes] = []  # notices, oldest first
        self._posted_bytes = 0

    def send_bytes(self, data: bytes) -> bool:
        outbox = getattr(burst, "outbox", None)
        with self._send_lock:
            if self.closed:
                return False
            if outbox is not None:
                self._out.append(data)
                outbox.add(self)
                return True
            if self._out:  # frames queued by a burst go first: order per destination holds
                data = b"".join(self._out) + data
                self._out.clear()
            return self._write(data)

    def queue(self, frames: list[bytes], outbox: set) -> bool:
        """Add a burst's frames for this destination; they are written at flush()."""
        with self._send_lock:
            if self.closed:
                return False
            self._out += frames
            outbox.add(self)
            return True

    def flush(self) -> None:
        with self._send_lock:
            if self._out and not self.closed:
                data = b"".join(self._out)
                self._out.clear()
                self._write(data)

    def post(self, data: bytes) -> bool:
        """A notice from any thread, written without waiting on this socket: now if nobody is
        writing to it and it has room, otherwise soon after (see the class). A connection with
        more than MAX_POSTED bytes of notices waiting is not reading them: it is closed."""
        with self._posted_lock:
            if self.closed:
                return False
            self._posted.append(data)
            self._posted_bytes += len(data)
            overflowing = self._posted_bytes + len(self._tail) > MAX_POSTED
        if overflowing:
            self.abort(wire.error("timeout", f"more than {MAX_POSTED} bytes of notices waited for you to read them"))
            return False
        self.flush_posted()
        return True

    @property
    def has_posted(self) -> bool:
        return bool(self._posted or self._tail)

    def flush_posted(self) -> None:
        """Write the waiting notices as far as the socket takes them now. Never waits: a
        writer of the moment, or a burst with frames queued here, takes them along instead."""
        if not (self._posted or self._tail) or not self._send_lock.acquire(blocking=False):
            return
        try:
            if self.closed:
                return
            if self._out:  # a burst's frames wait here: the notices go behind them, at its flush
                self._out.append(self._take_posted())
                return
            data = self._tail + self._take_posted()
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            self._tail = data[sent:]
        finally:
            self._send_lock.release()

    def _take_posted(self) -> bytes:
        with self._posted_lock:
            data = b"".join(self._posted)
            self._posted.clear()
            self._posted_bytes = 0
        return data

    def _write(self, data: bytes) -> bool:  # called with _send_lock held
        if self._tail or self._posted:
            data = self._tail + data + self._take_posted()
            self._tail = b""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.close()
            return False

    def send(self, message: dict) -> bool:
        return self.send_bytes(wire.encode(message))

    def close(self) -> None:
        """Send what is queued (an error frame, typically) as far as the socket takes it
        without waiting, then hang up."""
        with self._send_lock:
            if self.closed:
                return
            data = self._tail + b"".join(self._out) + self._take_posted()
            self._out.clear()
            if data:
                try:
                    self.sock.send(data, socket.MSG_DONTWAIT)
                except OSError:
                    pass
            self.closed = True
        hang_up(self.sock)

    def abort(self, message: dict) -> None:
        """Close from another thread (the watchdog, a notice that overflowed, a newer login of
        the name) with `message` if the socket takes it at once: never wait on a writer that
        is stuck on a slow reader."""
        if self._send_lock.acquire(blocking=False):
            try:
                if not self.closed and not self._tail:  # never after part of a frame
                    self.sock.send(wire.encode(message), socket.MSG_DONTWAIT)
            except OSError:
                pass
            finally:
                self._send_lock.release()
        self.closed = True
        hang_up(self.sock)

    @property
    def label(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


def timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))

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


class Connection:
    """One client's socket as the node writes to it: frames are coalesced per burst.

    Thread-safety: any thread may write (a sender's connection thread delivers to this
    one); every write and `_out` are under `_send_lock`. Only the owning connection thread
    reads the socket. `closed` only ever goes from False to True.
    """

    def __init__(self, sock: socket.socket, address):
        self.sock = sock
        self.address = address
        self.closed = False
        self._send_lock = threading.RLock()  # close() takes it too, from inside a failed write
        self._out: list[bytes] = []

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

    def _write(self, data: bytes) -> bool:  # called with _send_lock held
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.close()
            return False

    def send(self, message: dict) -> bool:
        return self.send_bytes(wire.encode(message))

    def close(self) -> None:
        """Send what is queued (an error frame, typically), then hang up."""
        with self._send_lock:
            if self.closed:
                return
            if self._out:
                data = b"".join(self._out)
                self._out.clear()
                try:
                    self.sock.sendall(data)
                except OSError:
                    pass
            self.closed = True
        hang_up(self.sock)

    def abort(self, message: dict) -> None:
        """From the watchdog: never wait on a writer that is stuck on a slow reader."""
        if self._send_lock.acquire(blocking=False):
            try:
                if not self.closed:
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

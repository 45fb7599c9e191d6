"""One client connection as the node sees it: its socket, session state, and
writes that are coalesced per burst."""
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
    def __init__(self, sock: socket.socket, address, clock):
        self.sock = sock
        self.address = address
        self.name: str | None = None
        self.name_bytes = b""
        self.proved = False
        self.phase = "connected"
        self.hello: dict | None = None
        self.nonce = ""
        self.decoder = wire.FrameDecoder()
        self.connected_at = self.last_frame_at = clock()
        self.frame_started_at: float | None = None
        self.errors = 0
        self.req: int | None = None  # the request id of the message being handled
        self.relayed = 0  # messages this connection sent that reached their recipient
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
        return self.name or f"{self.address[0]}:{self.address[1]}"


def timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))

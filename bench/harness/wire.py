"""One bare client connection for the load generators: a blocking socket, the project's
sans-IO handshake (dm.wire.handshake.ClientHandshake) and frames via dm.wire."""
from __future__ import annotations

import collections
import socket

from benchlib import HOST
from dm import crypto, wire
from dm.net import hang_up
from dm.wire.handshake import ClientHandshake

RECV = 256 * 1024  # a larger recv() gets fresh (kernel-zeroed) pages every call: 3x slower here


def load_key(path: str):
    """(RSA private key, its public PEM) from a key file."""
    key = crypto.load_private_key(path)
    return key, crypto.public_key_pem(key)


class Wire:
    """`decoder` holds any partial frame; `pending` the messages read off the socket but not yet
    returned by read() (after the handshake: whatever arrived behind the welcome)."""

    def __init__(self, port: int, timeout: float = 60):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = wire.MessageDecoder()
        self.pending: collections.deque[dict] = collections.deque()

    def handshake(self, name: str, key, pem: str, eth_address: str) -> dict:
        """hello -> challenge -> auth -> welcome; returns the welcome. Raises HandshakeRefused."""
        handshake = ClientHandshake(name, pem, eth_address, lambda data: crypto.sign(key, data))
        self.sock.sendall(handshake.hello())
        while not handshake.done:
            reply = handshake.receive(self.sock.recv(RECV))
            if reply:
                self.sock.sendall(reply)
        self.decoder = handshake.decoder
        self.pending.extend(handshake.unread())
        return handshake.welcome

    def write(self, message: dict) -> None:
        self.sock.sendall(wire.encode(message))

    def read(self) -> dict:
        while not self.pending:
            data = self.sock.recv(RECV)
            if not data:
                raise ConnectionError("the node closed the connection")
            self.pending.extend(self.decoder.feed_messages(data))
        return self.pending.popleft()

    def expect(self, kind: str) -> dict:
        message = self.read()
        if message["type"] != kind:
            raise RuntimeError(f"expected {kind!r} from the node, got {str(message)[:300]}")
        return message

    def close(self) -> None:
        hang_up(self.sock)
        self.sock.close()

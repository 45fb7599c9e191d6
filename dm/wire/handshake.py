"""The client's side of the handshake, sans-IO: hello -> challenge -> auth -> welcome.

One implementation for the client, the benchmarks and the tests:

    handshake = ClientHandshake(name, public_pem, eth_address, sign)
    sock.sendall(handshake.hello())
    while not handshake.done:
        sock.sendall(handshake.receive(sock.recv(65536)))   # b"" when there is nothing to send
    handshake.welcome          # the node's welcome message
    handshake.decoder          # keeps any frames that arrived behind the welcome

`sign(data) -> bytes` proves the RSA key; the caller owns the key.
"""
from __future__ import annotations

import base64
from typing import Callable

from .frames import MessageDecoder, encode
from .messages import auth_payload


class HandshakeRefused(Exception):
    """The node answered the handshake with an error, or with something out of order."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{message} ({code})")


class ClientHandshake:
    def __init__(self, name: str, public_pem: str, eth_address: str, sign: Callable[[bytes], bytes]):
        self.name, self.public_pem, self.eth_address, self._sign = name, public_pem, eth_address, sign
        self.decoder = MessageDecoder()
        self.welcome: dict | None = None
        self._expected = "challenge"
        self._unread: list[dict] = []

    @property
    def done(self) -> bool:
        return self.welcome is not None

    def hello(self) -> bytes:
        return encode({"type": "hello", "name": self.name, "public_key": self.public_pem,
                       "eth_address": self.eth_address})

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the node; returns what to send next (b"" for nothing).
        Raises HandshakeRefused on an error, and ProtocolError on a broken stream;
        an empty `data` means the node hung up."""
        if not data:
            raise HandshakeRefused("closed", "the node closed the connection during the handshake")
        out = b""
        for message in self.decoder.feed_messages(data):
            if self.done:  # frames behind the welcome are the caller's: keep them queued
                self._unread.append(message)
                continue
            out += self._on(message)
        return out

    def _on(self, message: dict) -> bytes:
        kind = message["type"]
        if kind == "error":
            raise HandshakeRefused(str(message.get("code")), str(message.get("message")))
        if kind != self._expected:
            raise HandshakeRefused("out_of_order", f"unexpected {kind!r} from the node during the handshake")
        if kind == "challenge":
            self._expected = "welcome"
            data = auth_payload(message["nonce"], message["node_id"], self.name, self.public_pem, self.eth_address)
            return encode({"type": "auth", "signature": base64.b64encode(self._sign(data)).decode()})
        self.welcome = message
        return b""

    def unread(self) -> list[dict]:
        """Messages that arrived in the same read as the welcome, in order (then cleared)."""
        messages, self._unread = self._unread, []
        return messages

"""The one node factory, the one raw wire login and the one frame-filtering proxy the tests share
(conftest's fixtures and the child-process node in test_abuse both build nodes here)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from dm import crypto, datadir, wire
from dm.chain import ethereum
from dm.chain.faucet import Faucet, fund_user
from dm.relay.bounties import BountyIndex
from dm.relay.node import Node
from dm.wire.handshake import ClientHandshake, HandshakeRefused

# An envelope of the shape the node relays (dm.wire.check_envelope, the fast reader's order): the
# node never opens it, so tests that are about routing or payment can send this one.
OPAQUE_ENVELOPE = {"from": "x", "to": "y", "msg_id": "m", "ts": 1, "wrapped_key": "QUJD", "nonce": "bm9u",
                   "code_slot": "A" * 43 + "=", "digest": "A" * 43 + "=", "ciphertext": "QUJD", "signature": "c2ln"}


def start_node(token: ethereum.BountyToken, data_dir: Path, *, faucet: ethereum.Signer | None = None,
               lookups_per_second: float | None = None, signer: ethereum.Signer | None = None,
               **options) -> Node:
    """A started node on `token`'s chain with a fresh account (or `signer`'s, to restart a node),
    its files under data_dir/node, redeeming quickly. `faucet` funds the node's gas and new users
    (one Signer per key: one nonce sequence, so share it between nodes)."""
    signer = signer or ethereum.Signer(token.w3, ethereum.new_account()[1])
    if faucet is not None:
        fund_user(token, faucet, signer.address, btk=0)
    index = BountyIndex(token, signer.address, books_dir=data_dir / "node" / "books",
                        **({} if lookups_per_second is None else {"lookups_per_second": lookups_per_second}))
    options = {"host": "127.0.0.1", "port": 0, "handshake_timeout": 3, "frame_timeout": 3,
               "redeemer_options": {"batch_size": 20, "batch_wait": 0.2}, **options}
    node = Node(token=token, signer=signer, data_dir=data_dir, index=index,
                faucet=Faucet(token, faucet) if faucet is not None else None, **options)
    node.start()
    return node


def user_keys(data_dir: Path, name: str):
    rsa_key = crypto.load_private_key(datadir.private_key_path(data_dir, name))
    eth = ethereum.address_of(datadir.read_secret(datadir.eth_key_path(data_dir, name)))
    return rsa_key, crypto.public_key_pem(rsa_key), eth


def login(sock: socket.socket, data_dir: Path, name: str, *, signing_key=None, as_name: str | None = None,
          eth_address: str | None = None, timeout: float = 10) -> dict:
    """The client's handshake (dm.wire.handshake) on a raw socket, with `name`'s keys, claiming
    `as_name` (default: `name`) and `eth_address` (default: `name`'s account). Returns the
    node's answer to `auth`: the welcome, or the error frame it refused with."""
    rsa_key, pem, eth = user_keys(data_dir, name)
    handshake = ClientHandshake(as_name or name, pem, eth_address or eth,
                                lambda data: crypto.sign(signing_key or rsa_key, data))
    sock.settimeout(timeout)
    sock.sendall(handshake.hello())
    try:
        while not handshake.done:
            sock.sendall(handshake.receive(sock.recv(65536)))
    except HandshakeRefused as refused:
        return {"type": "error", "code": refused.code, "message": refused.message}
    return handshake.welcome


class Transport:
    """A session's writer that keeps what was written (frames, in order)."""

    def __init__(self, name: str):
        self.address = ("test", name)
        self.label = name
        self.closed = False
        self.written = bytearray()

    def send_bytes(self, data: bytes) -> bool:
        if not self.closed:
            self.written += data
        return not self.closed

    def send(self, message: dict) -> bool:
        return self.send_bytes(wire.encode(message))

    post = send_bytes  # a notice: nothing to wait for here
    has_posted = False

    def queue(self, frames: list[bytes], outbox) -> bool:
        return self.send_bytes(b"".join(frames))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self, message: dict) -> None:
        self.send(message)
        self.close()

    def take(self) -> bytes:
        """What was written since the last take()."""
        written, self.written = bytes(self.written), bytearray()
        return written


class FrameProxy:
    """A real TCP proxy in front of a node. The client's bytes go through as they are; each frame
    from the node goes through from_node(message), which says "pass", "drop" (this frame only) or
    "cut" (drop it and hang up). A connection after the first (a reconnect) waits `hold` seconds."""

    def __init__(self, node_port: int, hold: float = 0.0):
        self.node_port, self.hold = node_port, hold
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def from_node(self, message: dict) -> str:
        return "pass"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                if self.connections:
                    time.sleep(self.hold)
                upstream = socket.create_connection(("127.0.0.1", self.node_port))
                self.sockets += [client, upstream]
                self.connections += 1
                threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source, sink, from_node: bool) -> None:
        decoder = wire.FrameDecoder()
        with contextlib.suppress(OSError, wire.ProtocolError):
            while data := source.recv(65536):
                if not from_node:
                    sink.sendall(data)
                elif not self._pass(decoder.feed(data), sink):
                    break
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pass(self, payloads: list[bytes], sink) -> bool:
        """Pass the node's frames on as from_node says; False once it says cut."""
        for payload in payloads:
            verdict = self.from_node(wire.parse(payload))
            if verdict == "cut":
                return False
            if verdict == "pass":
                sink.sendall(wire.HEADER.pack(len(payload)) + payload)
        return True

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

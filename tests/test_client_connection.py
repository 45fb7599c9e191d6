"""The client's connection against a scripted fake node: the handshake's refusals
in the user's words, and replies matched by request id whatever their order,
with anything unmatched left for the inbox."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from dm import wire
from dm.client.connection import CLOSED, Connection
from dm.client.core import ChatClient, ClientError
from dm.chain import ethereum
from dm.wire.handshake import ClientHandshake
from conftest import make_users

CHALLENGE = {"type": "challenge", "nonce": "bm9uY2U=", "node_id": "fake"}
WELCOME = {"type": "welcome", "name": "alice", "node_eth_address": "0x" + "11" * 20, "chain_id": 1,
           "contract": "0x" + "22" * 20}
HANDSHAKE_WAIT = 3  # seconds open_connection() waits for each answer: a silent fake node fails fast


@contextlib.contextmanager
def fake_node(script):
    """A node that accepts one connection and runs script(sock, read) on it; read() returns its next message."""
    server = socket.create_server(("127.0.0.1", 0))
    failures: list[BaseException] = []

    def serve() -> None:
        sock, _ = server.accept()
        decoder, queued = wire.MessageDecoder(), []

        def read() -> dict:
            while not queued:
                data = sock.recv(65536)
                assert data, "the client hung up"
                queued.extend(decoder.feed_messages(data))
            return queued.pop(0)

        try:
            with sock:
                script(sock, read)
        except BaseException as exc:  # noqa: B036 (re-raised in the test)
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        thread.join(10)
        server.close()
    assert not failures, failures


def open_connection(port: int) -> Connection:
    connection = Connection("127.0.0.1", port)
    connection.open(ClientHandshake("alice", "PEM", "0xA", lambda data: b"signature"), timeout=HANDSHAKE_WAIT)
    return connection


def handshake_then(sock, read, after: bytes = b"") -> None:
    assert read()["type"] == "hello"
    sock.sendall(wire.encode(CHALLENGE))
    assert read()["type"] == "auth"
    sock.sendall(wire.encode(WELCOME) + after)


@pytest.mark.parametrize("script, expected", [
    (lambda sock, read: read(), "^the node closed the connection during the handshake$"),
    (lambda sock, read: (read(), sock.sendall(wire.encode(WELCOME))),
     "^unexpected 'welcome' from the node during the handshake$"),
    (lambda sock, read: (read(), sock.sendall(wire.encode(wire.error("busy")))),
     r"^the node refused us: the node has too many connections \(busy\)$"),
    (lambda sock, read: (read(), sock.sendall(wire.HEADER.pack(wire.MAX_FRAME + 1))),
     r"^127\.0\.0\.1:\d+ is not a DistributedMessaging node: it answered with something else\. Check the host "
     r"and port: node.py listens on 12345 unless started with --port$"),
    (lambda sock, read: (read(), sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")),  # a server that greets first
     r"is not a DistributedMessaging node: it answered with something else\. Check the host and port"),
    (lambda sock, read: (read(), time.sleep(HANDSHAKE_WAIT + 1)),  # a server that says nothing
     rf"is not a DistributedMessaging node: nothing answered our greeting within {HANDSHAKE_WAIT}s\. Check "),
], ids=["closed", "out-of-order", "refused", "broken-frame", "greets-first", "silent"])
def test_a_failed_handshake_is_a_client_error_in_the_users_words(script, expected):
    with fake_node(script) as port:
        with pytest.raises(ClientError, match=expected):
            open_connection(port)


def test_a_name_pinned_to_another_key_is_refused_in_the_nodes_words(tester_node, tmp_path):
    make_users(tester_node.data_dir, "alice")
    tester_node.client("alice")
    elsewhere = tmp_path / "impostor"
    elsewhere.mkdir(mode=0o700)
    make_users(elsewhere, "alice")  # the same name, another key
    impostor = ChatClient("127.0.0.1", tester_node.port, "alice", elsewhere, rpc_url=ethereum.TESTER_URL,
                          w3=tester_node.node.token.w3)
    with pytest.raises(ClientError, match=r"^the node refused us: the name 'alice' is pinned to another key "
                                          r"on this node \(name_taken\)$"):
        impostor.connect()


def test_replies_are_matched_by_id_in_any_order_and_the_rest_goes_to_the_inbox():
    strays = [{"type": "pong", "req": 999}, {"type": "peers", "names": []},
              {"type": "error", "code": "unknown_peer", "message": "late", "req": 998}]

    def script(sock, read):
        handshake_then(sock, read, after=wire.encode(strays[0]))  # in the welcome's own read
        first, second = read(), read()
        assert (first["type"], second["type"]) == ("lookup", "lookup") and first["req"] != second["req"]
        sock.sendall(wire.encode(strays[1]))
        for request in (second, first):  # the other way round
            sock.sendall(wire.encode({"type": "lookup", "name": request["name"], "public_key": "KEY-" + request["name"],
                                      "eth_address": "0xB", "req": request["req"]}))
        sock.sendall(wire.encode(strays[2]))
        refused = read()
        sock.sendall(wire.encode(wire.error("unknown_peer", "no user 'x'") | {"req": refused["req"]}))
        assert read()["type"] == "peers"  # answered by silence...
        sock.recv(65536)  # ...that lasts until the client hangs up (a closed connection fails requests at once)

    with fake_node(script) as port:
        connection = open_connection(port)
        try:
            replies = connection.request_all([{"type": "lookup", "name": "b"}, {"type": "lookup", "name": "c"}])
            assert [(r["name"], r["public_key"]) for r in replies] == [("b", "KEY-b"), ("c", "KEY-c")]
            with pytest.raises(ClientError, match=r"^no user 'x' \(unknown_peer\)$"):
                connection.request({"type": "lookup", "name": "x"})
            with pytest.raises(ClientError, match="^the node did not answer our 'peers'$"):
                connection.request({"type": "peers"}, timeout=0.3)
        finally:
            connection.close()
        inbox = [connection.inbox.get(timeout=5) for _ in range(4)]
        assert inbox[:3] == strays and inbox[3]["type"] == CLOSED

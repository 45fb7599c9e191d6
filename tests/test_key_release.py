"""Key release on claim: no code, no reading (issue 10, part 1).

Before this, a recipient that decrypted but never returned the code read everything for free,
and a colluding pair moved any amount of text through the node for nothing. Now the node's
own layer covers every relayed ciphertext and its key comes back only for a valid code.
Real node, real sockets, real chain (eth-tester).
"""
from __future__ import annotations

import base64
import queue

import pytest

from conftest import logged_in_sockets, make_users, wait_until
from dm import crypto, datadir, wire
from dm.chain import ethereum
from dm.client.core import ChatClient, Events
from helpers import OPAQUE_ENVELOPE, FrameProxy
from test_abuse import read_frame
from test_relay_burst import open_announced_book


def private_key(data_dir, name):
    return crypto.load_private_key(datadir.private_key_path(data_dir, name))


def send(sock, to: str, bounty: dict, envelope: dict) -> None:
    sock.sendall(wire.encode({"type": "send", "to": to, "msg_id": envelope["msg_id"], "bounty": bounty,
                              "envelope": envelope}))


@pytest.fixture
def pair(tester_node):
    with logged_in_sockets(tester_node.port, tester_node.data_dir, "alice", "bob") as socks:
        yield tester_node, socks


def test_a_recipient_that_never_claims_reads_nothing_and_every_message_read_is_paid(pair):
    node, socks = pair
    data_dir, alice, bob = node.data_dir, socks["alice"], socks["bob"]
    book = open_announced_book(node.node, data_dir, alice, "alice", 3)
    bob_key = private_key(data_dir, "bob")
    texts = ["first secret", "second secret", "never paid for"]
    envelopes = crypto.seal_many([({"text": text}, "bob", bob_key.public_key(), f"m{i}", book.codes[i])
                                  for i, text in enumerate(texts)], sender="alice",
                                 sender_key=private_key(data_dir, "alice"))
    for i, envelope in enumerate(envelopes):
        send(alice, "bob", {"book": book.root.hex(), "index": i}, envelope)
    assert [read_frame(alice)["status"] for _ in texts] == ["delivered"] * 3
    delivers = [read_frame(bob) for _ in texts]

    opened = []
    for deliver, sent in zip(delivers, envelopes):
        relayed = deliver["envelope"]
        # Everything but the ciphertext arrives as sent, and the signature checks before paying.
        assert {**relayed, "ciphertext": sent["ciphertext"]} == sent
        slot = crypto.open_slot(relayed, recipient="bob", recipient_key=bob_key,
                                sender_public_key=private_key(data_dir, "alice").public_key())
        assert slot.code == book.codes[int(deliver["msg_id"][1:])]
        # Without the node's key the text does not open: not as the end-to-end ciphertext, not whole.
        with pytest.raises(crypto.BadSignature):
            crypto.open_ciphertext(slot, base64.b64decode(relayed["ciphertext"]))
        with pytest.raises(crypto.EnvelopeError):
            crypto.open_envelope(relayed, recipient="bob", recipient_key=bob_key,
                                 sender_public_key=private_key(data_dir, "alice").public_key())
        opened.append(slot)

    # A wrong code gets no key (and leaves the message claimable).
    bob.sendall(wire.encode({"type": "claim", "msg_id": "m0", "code": book.codes[1].hex()}))
    refusal = read_frame(bob)
    assert refusal["type"] == "error" and refusal["code"] == "bad_code" and refusal["ref"] == "m0"

    # bob reads the first two: each valid code brings the key that opens that message alone.
    for i in (0, 1):
        bob.sendall(wire.encode({"type": "claim", "msg_id": f"m{i}", "code": opened[i].code.hex()}))
        release = read_frame(bob)
        assert release["type"] == "release" and release["msg_id"] == f"m{i}"
        key = bytes.fromhex(release["key"])
        inner = crypto.open_node_layer(key, delivers[i]["envelope"]["ciphertext"])
        assert crypto.open_ciphertext(opened[i], inner) == {"text": texts[i]}
        with pytest.raises(crypto.WrongRelease):  # one message's key opens no other
            crypto.open_node_layer(key, delivers[2]["envelope"]["ciphertext"])
    with pytest.raises(TimeoutError):
        read_frame(bob, timeout=0.3)  # nothing else came: no key for the unclaimed message

    # The node is paid for exactly the two messages that were read, and alice is told so.
    token, relayer = node.node.token, node.node.signer.address
    wait_until(lambda: token.balance_of(relayer) == 2 * ethereum.TOKEN, timeout=20, message="two redemptions")
    paid = read_frame(alice, timeout=10)
    assert paid["type"] == "paid" and sorted(paid["msg_ids"]) == ["m0", "m1"]
    alice_account = ethereum.address_of(datadir.read_secret(datadir.eth_key_path(data_dir, "alice")))
    assert [token.is_leaf_spent(alice_account, book.root, i) for i in range(3)] == [True, True, False]


WIDER_CHANNELS = [  # (what the colluders change, what the refusal names)
    ({"code_slot": base64.b64encode(b"x" * 33).decode()}, "code_slot"),
    ({"code_slot": "A" * 42 + "B="}, "code_slot"),  # 32 bytes and 2 spare bits
    ({"code_slot": base64.b64encode(b"x" * 31).decode()}, "code_slot"),
    ({"digest": base64.b64encode(b"x" * 64).decode()}, "digest"),
    ({"wrapped_key": base64.b64encode(bytes(wire.MAX_VISIBLE)).decode()}, "outside its ciphertext"),
    ({"ciphertext": "not base64!"}, "base64"),
]


def test_a_colluding_pair_gets_at_most_32_bytes_a_message_past_the_node(pair):
    """alice and bob collude to pass text by the node unpaid: bob reads the code slot before
    he pays, so they try to widen it, or to read more before paying. Every such shape is
    refused, on both readers (the compact canonical frame, and the same with its keys reordered)."""
    node, socks = pair
    book = open_announced_book(node.node, node.data_dir, socks["alice"], "alice", 1)
    bounty = {"book": book.root.hex(), "index": 0}
    for change, problem in WIDER_CHANNELS:
        envelope = {**OPAQUE_ENVELOPE, "msg_id": "smuggle", **change}
        socks["alice"].sendall(wire.encode({"type": "send", "to": "bob", "msg_id": "smuggle", "bounty": bounty,
                                            "envelope": envelope}))
        socks["alice"].sendall(wire.encode({"envelope": envelope, "bounty": bounty, "msg_id": "smuggle2",
                                            "to": "bob", "type": "send"}))
        for msg_id in ("smuggle", "smuggle2"):
            refusal = read_frame(socks["alice"])
            assert refusal["type"] == "error" and refusal["code"] == "bad_field" and refusal["ref"] == msg_id
            assert problem in refusal["message"], (change, refusal["message"])
    with pytest.raises(TimeoutError):
        read_frame(socks["bob"], timeout=0.3)
    # The leaf is still good: the same message with a 32-byte slot goes, and that is all bob reads.
    smuggled = bytes(range(32))
    envelope = {**OPAQUE_ENVELOPE, "msg_id": "ok", "code_slot": base64.b64encode(smuggled).decode(),
                "ciphertext": base64.b64encode(b"the long text they hoped to pass for free" * 50).decode()}
    send(socks["alice"], "bob", bounty, envelope)
    assert read_frame(socks["alice"])["status"] == "delivered"
    deliver = read_frame(socks["bob"])
    assert base64.b64decode(deliver["envelope"]["code_slot"]) == smuggled
    assert deliver["envelope"]["ciphertext"] != envelope["ciphertext"]
    visible = len(wire.encode(deliver)) - 4 - len(deliver["envelope"]["ciphertext"])
    assert visible <= wire.MAX_VISIBLE


class ReleaseDroppingProxy(FrameProxy):
    """Passes every frame but `release`: a node that takes the code and keeps the key, as the
    client sees it."""

    def __init__(self, node_port: int):
        self.dropped: list[dict] = []
        super().__init__(node_port)

    def from_node(self, message: dict) -> str:
        if message["type"] == "release":
            self.dropped.append(message)
            return "drop"
        return "pass"


def test_a_node_that_takes_the_code_and_keeps_the_key_is_reported(tester_node):
    make_users(tester_node.data_dir, "alice", "bob")
    proxy = ReleaseDroppingProxy(tester_node.port)
    notices: queue.Queue = queue.Queue()
    shown: queue.Queue = queue.Queue()
    bob = ChatClient("127.0.0.1", proxy.port, "bob", tester_node.data_dir, rpc_url=ethereum.TESTER_URL,
                     w3=tester_node.node.token.w3, release_timeout=0.5,
                     events=Events(message=shown.put, notice=notices.put))
    try:
        bob.connect()
        alice = tester_node.client("alice", book_size=2)
        msg_id = alice.send_text("bob", "you will not see this")
        notice = notices.get(timeout=15)
        assert msg_id in notice and "alice" in notice and "no key within 0.5s" in notice
        assert "use another node" in notice  # says what to do next
        assert [m["msg_id"] for m in proxy.dropped] == [msg_id]  # the node did answer; the key was kept
        assert shown.empty()  # nothing shown: the text never opened
        with pytest.raises(queue.Empty):
            notices.get(timeout=1)  # reported once
    finally:
        bob.close()
        proxy.close()


def test_the_release_timeout_is_a_client_flag(capsys):
    from dm.cli import client as client_cli

    assert client_cli.parse_args(["localhost", "1", "alice", "bob"]).release_timeout == 10
    assert client_cli.parse_args(["localhost", "1", "alice", "bob", "--release-timeout", "0.5"]).release_timeout == 0.5
    assert client_cli.main(["localhost", "1", "alice", "bob", "--release-timeout", "0"]) == 1
    assert "--release-timeout must be a positive number of seconds" in capsys.readouterr().err

"""Fair pay: a bounty pays only for its own sender's messages (issue 10, defect 2).

Every recipient, and every member of a channel one posts in, sees the sender's book root
and leaf index in `deliver`. Before this, anyone could send their own traffic on someone
else's next leaves: the node relayed it, and the owner's own messages were then refused.
"""
from __future__ import annotations

import contextlib

import pytest

from dm import wire
from conftest import make_users
from test_abuse import connect, raw_login, read_frame
from test_relay_burst import open_announced_book, send_frame


@pytest.fixture
def trio(tester_node):
    make_users(tester_node.data_dir, "alice", "bob", "carol")
    with contextlib.ExitStack() as stack:
        socks = {}
        for name in ("alice", "bob", "carol"):
            socks[name] = connect(tester_node.port, stack, timeout=10)
            assert raw_login(socks[name], tester_node.data_dir, name)["type"] == "welcome"
        yield tester_node, socks


def test_a_recipient_cannot_spend_the_senders_book_and_the_sender_is_unaffected(trio):
    node, socks = trio
    book = open_announced_book(node.node, node.data_dir, socks["alice"], "alice", 4)
    root = book.root.hex()
    socks["alice"].sendall(send_frame("bob", "a0", root, 0))
    assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "a0", "status": "delivered"}
    deliver = read_frame(socks["bob"])
    assert deliver["bounty"] == {"book": root, "index": 0}  # bob now knows alice's book

    # bob sends his own message to carol on alice's next leaf, on the fast reader and the general one
    socks["bob"].sendall(send_frame("carol", "b1", root, 1))
    refusal = read_frame(socks["bob"])
    assert refusal["type"] == "error" and refusal["code"] == "unpaid" and refusal["ref"] == "b1"
    alice_address = node.node.pins.get("alice")["eth_address"]
    assert alice_address in refusal["message"], refusal["message"]
    socks["bob"].sendall(wire.encode({"type": "send", "envelope": {"x": 1}, "to": "carol", "msg_id": "b2",
                                      "bounty": {"book": "0x" + root.upper(), "index": 1}}))
    refusal = read_frame(socks["bob"])
    assert refusal["code"] == "unpaid" and refusal["ref"] == "b2"
    with pytest.raises(TimeoutError):
        read_frame(socks["carol"], timeout=0.5)

    # alice's own next leaf is untouched
    socks["alice"].sendall(send_frame("bob", "a1", root, 1))
    assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "a1", "status": "delivered"}
    assert read_frame(socks["bob"])["msg_id"] == "a1"

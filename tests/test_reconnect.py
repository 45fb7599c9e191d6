"""Surviving the node going away: the node answers a resend with its original outcome, and
the client keeps every unacknowledged message in an outbox on disk, reconnects by itself,
and sends it again with the same msg_id and bounty. Real sockets, real EVM (eth-tester)."""
from __future__ import annotations

import pytest

from conftest import logged_in_sockets, wait_until
from dm import wire
from test_abuse import read_frame
from test_relay_burst import open_announced_book, send_frame


def test_a_resend_of_a_delivered_message_is_answered_delivered_and_not_delivered_again(tester_node):
    node = tester_node.node
    with logged_in_sockets(tester_node.port, tester_node.data_dir, "alice", "bob") as socks:
        alice, bob = socks["alice"], socks["bob"]
        root = open_announced_book(node, tester_node.data_dir, alice, "alice", 3).root.hex()
        original = send_frame("bob", "m1", root, 0)
        alice.sendall(original)
        assert read_frame(alice) == {"type": "receipt", "msg_id": "m1", "status": "delivered"}
        assert read_frame(bob)["msg_id"] == "m1"

        alice.sendall(original)  # the receipt "was lost": the client sends the very same frame again
        assert read_frame(alice) == {"type": "receipt", "msg_id": "m1", "status": "delivered"}
        with pytest.raises(TimeoutError):
            read_frame(bob, timeout=0.5)

        # Once its code came back and the node forgot the pending entry, a resend is still answered.
        bob.sendall(wire.encode({"type": "claim", "msg_id": "m1", "code": "00" * 32}))
        assert read_frame(bob)["code"] == "bad_code"  # (the code is not the point here)
        node.ledger.settle(node.ledger.pending["m1"])
        wait_until(lambda: not isinstance(node.ledger.used[("book", root, 0)], tuple), message="forgotten")
        alice.sendall(original)
        assert read_frame(alice) == {"type": "receipt", "msg_id": "m1", "status": "delivered"}
        with pytest.raises(TimeoutError):
            read_frame(bob, timeout=0.3)

        # The same bounty under another msg_id is still a reuse, refused.
        alice.sendall(send_frame("bob", "m2", root, 0))
        refusal = read_frame(alice)
        assert (refusal["type"], refusal["code"], refusal["ref"]) == ("error", "unpaid", "m2")

"""Surviving the node going away: the node answers a resend with its original outcome, and
the client keeps every unacknowledged message in an outbox on disk, reconnects by itself,
and sends it again with the same msg_id and bounty. Real sockets, real EVM (eth-tester)."""
from __future__ import annotations

import queue
import threading
import time

import pytest

from conftest import collecting_events, logged_in_sockets, make_users, wait_until
from dm import wire
from dm.chain import ethereum
from dm.chain.faucet import faucet_signer
from dm.client.core import ChatClient
from dm.net import free_port
from helpers import start_node
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


# --- the client: outbox, reconnect, offline peers --------------------------------------------

def restartable_node(tester_chain, data_dir):
    """A node on eth-tester, and a function that stops it and starts it again on the same
    port, with the same account and data directory (as node.py does with node/node_ETH.key)."""
    w3, token = tester_chain
    faucet = faucet_signer(w3, data_dir)
    node = start_node(token, data_dir, faucet=faucet)
    signer, port = node.signer, node.port

    def restart_after(pause: float, running: list) -> None:
        running[0].stop()
        time.sleep(pause)
        running[0] = start_node(token, data_dir, faucet=faucet, signer=signer, port=port)

    return [node], restart_after


def recording_events():
    """(Incoming queue, states seen, receipts by msg_id, paid msg_ids, queued, Events)."""
    inbox, receipts, paid, events = collecting_events()
    states: list[tuple[str, str]] = []
    queued: list[tuple[str, str]] = []
    events.connection = lambda state, detail: states.append((state, detail))
    events.queued = lambda msg_id, peer: queued.append((msg_id, peer))
    return inbox, states, receipts, paid, queued, events


def test_a_node_restart_costs_a_moment_and_a_line_sent_meanwhile_arrives_once_paid_once(tester_chain, data_dir):
    make_users(data_dir, "alice", "bob")
    w3, token = tester_chain
    running, restart_after = restartable_node(tester_chain, data_dir)
    port = running[0].port
    alice_inbox, alice_states, receipts, paid, _, alice_events = recording_events()
    bob_inbox, bob_states, _, _, _, bob_events = recording_events()
    dead = ("127.0.0.1", free_port())  # listed first: every round tries it, and goes on to the next
    options = dict(rpc_url=ethereum.TESTER_URL, w3=w3, reconnect_max_delay=0.3, book_size=4)
    alice = ChatClient(me="alice", data_dir=data_dir, events=alice_events,
                       addresses=[dead, ("127.0.0.1", port)], **options)
    bob = ChatClient("127.0.0.1", port, "bob", data_dir, events=bob_events, **options)
    try:
        bob.connect()
        alice.connect()
        assert (alice.host, alice.port) == ("127.0.0.1", port)
        first = alice.send_text("bob", "before")
        assert bob_inbox.get(timeout=10).text == "before"
        wait_until(lambda: first in paid, timeout=15, message="the first message to be paid")

        stopper = threading.Thread(target=restart_after, args=(0.3, running))
        stopper.start()
        wait_until(lambda: alice.connection_state == "reconnecting", timeout=5, message="alice to notice")
        during = alice.send_text("bob", "while the node was down")  # paid, sealed, and kept on disk
        assert [e.msg_id for e in alice.queue()] == [during]
        stopper.join()

        incoming = bob_inbox.get(timeout=15)
        assert (incoming.sender, incoming.text, incoming.genuine) == ("alice", "while the node was down", True)
        wait_until(lambda: during in paid, timeout=15, message="the message sent meanwhile to be paid")
        assert receipts[during] == "delivered" and alice.queue() == []
        with pytest.raises(queue.Empty):
            bob_inbox.get(timeout=0.5)  # exactly once
        book = token.book(alice.payer._book.root)
        assert book.spent == 2  # "before" and the one sent meanwhile: each paid once
        for states in (alice_states, bob_states):  # each told once, then back by itself
            assert [s for s, _ in states] == ["lost", "reconnecting", "reconnected"], states
        assert alice_states[1][1] in ("0 queued", "1 queued")
        assert alice.connection_state == bob.connection_state == "connected"
    finally:
        alice.close()
        bob.close()
        running[0].stop()

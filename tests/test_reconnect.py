"""Surviving the node going away: the node answers a resend with its original outcome, and
the client keeps every unacknowledged message in an outbox on disk, reconnects by itself,
and sends it again with the same msg_id and bounty. Real sockets, real EVM (eth-tester)."""
from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time

import pytest

from conftest import collecting_events, logged_in_sockets, make_users, wait_until
from dm import wire
from dm.chain import ethereum
from dm.chain.faucet import faucet_signer
from dm.client.core import ChatClient, ClientError
from dm.client.outbox import Outbox, Queued
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
        alice_account = node.pins.get("alice")["eth_address"]
        wait_until(lambda: not isinstance(node.ledger.used[("book", root, 0, alice_account)], tuple),
                   message="forgotten")
        for _ in range(2):  # later sweeps keep the leaf used while its book is open on chain
            node.sweep(node.server.clock())
        assert node.ledger.used[("book", root, 0, alice_account)] == "m1"
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
    """(Incoming queue, states seen, receipts by msg_id, paid msg_ids, queued, Events); presence
    notices are appended to `states` as ("presence", name, online)."""
    inbox, receipts, paid, events = collecting_events()
    states: list[tuple] = []
    queued: list[tuple[str, str]] = []
    events.connection = lambda state, detail: states.append((state, detail))
    events.presence = lambda name, online: states.append(("presence", name, online))
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
        book = token.book(alice.eth_address, alice.payer._book.root)
        assert book.spent == 2  # "before" and the one sent meanwhile: each paid once
        for states in (alice_states, bob_states):  # each told once, then back by itself
            assert [s[0] for s in states if s[0] != "presence"] == ["lost", "reconnecting", "reconnected"], states
        reconnecting = next(detail for state, detail, *_ in alice_states if state == "reconnecting")
        assert reconnecting in ("0 queued", "1 queued")  # (the line may be typed before or after)
        assert alice.connection_state == bob.connection_state == "connected"
    finally:
        alice.close()
        bob.close()
        running[0].stop()


def test_a_message_to_an_offline_peer_waits_on_disk_across_a_client_restart_and_is_paid_on_delivery(tester_node):
    make_users(tester_node.data_dir, "alice", "bob")
    token = tester_node.node.token
    tester_node.client("bob").close()  # bob is known to the node, and offline
    _, _, receipts, _, queued, events = recording_events()
    alice = tester_node.client("alice", events, pay="single")
    msg_id = alice.send_text("bob", "for when you are back")
    dropped = alice.send_text("bob", "never mind this one")
    wait_until(lambda: len(queued) == 2, timeout=10, message="both to be queued for bob")
    assert queued == [(msg_id, "bob"), (dropped, "bob")] and receipts == {}
    code_hash = bytes.fromhex(alice.last_bounty["code_hash"])
    listing = alice.queue()
    assert [(e.index, e.msg_id, e.to, e.text) for e in listing] == [
        (1, msg_id, "bob", "for when you are back"), (2, dropped, "bob", "never mind this one")]
    assert all(e.waiting and e.since > time.time() - 60 for e in listing)
    assert alice.drop(2) and not alice.drop(2) and not alice.drop(0)
    assert token.bounty(alice.eth_address, code_hash).state == "open"  # the dropped one: never spent

    alice.close()  # a client restart: the outbox is a 0600 file under the client's data dir
    outbox = tester_node.data_dir / "clients" / "alice" / "outbox.journal"
    assert outbox.stat().st_mode & 0o777 == 0o600 and b"never mind" not in outbox.read_bytes()
    _, states, receipts, paid, queued, events = recording_events()
    alice = tester_node.client("alice", events, pay="single")
    assert [(e.msg_id, e.text) for e in alice.queue()] == [(msg_id, "for when you are back")]
    wait_until(lambda: queued == [(msg_id, "bob")], timeout=10, message="the restarted client to find bob offline")
    bounty_hash = bytes.fromhex(json.loads(alice.queue()[0].frame[4:])["bounty"]["code_hash"])
    assert token.bounty(alice.eth_address, bounty_hash).state == "open"  # nothing spent while bob is away

    bob_inbox, _, _, bob_events = collecting_events()
    tester_node.client("bob", bob_events)  # bob connects: the node tells alice, alice sends
    incoming = bob_inbox.get(timeout=10)
    assert (incoming.sender, incoming.msg_id, incoming.text) == ("alice", msg_id, "for when you are back")
    wait_until(lambda: msg_id in paid, timeout=15, message="the delivery to be paid")
    assert receipts[msg_id] == "delivered" and alice.queue() == [] and ("presence", "bob", True) in states
    assert token.bounty(alice.eth_address, bounty_hash).state == "redeemed"
    assert token.bounty(alice.eth_address, code_hash).state == "open"
    with pytest.raises(queue.Empty):
        bob_inbox.get(timeout=0.3)


def test_with_no_node_to_come_back_the_client_gives_up_and_says_what_to_do(extra_nodes, data_dir):
    node = extra_nodes("short-lived")
    make_users(data_dir, "alice")
    _, states, _, _, _, events = recording_events()
    reasons = []
    events.closed = reasons.append
    alice = ChatClient("127.0.0.1", node.port, "alice", data_dir, rpc_url=ethereum.TESTER_URL, events=events,
                       w3=node.token.w3, reconnect_for=0.8, reconnect_max_delay=0.2)
    alice.connect()
    try:
        node.stop()
        # Something on the port that hangs up on every connection: each try is counted.
        with socket.create_server(("127.0.0.1", node.port)) as hang_up_on_all:
            tries = []

            def count() -> None:
                while True:
                    try:
                        sock, _ = hang_up_on_all.accept()
                    except OSError:
                        return
                    tries.append(time.monotonic())
                    sock.close()

            threading.Thread(target=count, daemon=True).start()
            started = time.monotonic()
            wait_until(lambda: alice.is_closed, timeout=10, message="alice to give up")
            took = time.monotonic() - started
        # Pauses of at most 0.2 s (--reconnect-max-delay) for 0.8 s (--reconnect-for): several tries, then done.
        assert len(tries) >= 3 and 0.5 < took < 5, (tries, took)
        assert [s[0] for s in states] == ["lost", "reconnecting", "gave_up"]
        assert "restart the client" in states[-1][1] and reasons == [states[-1][1]]
        assert alice.connection_state == "closed"
        with pytest.raises(ClientError, match="restart the client"):
            alice.send_text("alice", "anyone?")
    finally:
        alice.close()


def test_the_outbox_journal_survives_a_crash_mid_record_and_keeps_only_the_unanswered(tmp_path):
    path = tmp_path / "outbox.journal"
    outbox = Outbox(path)
    entries = [Queued(f"m{i}", "bob", f"text {i} \ud800 ünï", b"\x00\x00\x00\x02{}" + bytes([i])) for i in range(4)]
    outbox.add(entries[:3])
    outbox.remove("m1")
    outbox.flush_answered()
    outbox.add(entries[3:])
    os.close(outbox._fd)  # a crash: no close(), and the last record is cut short
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    assert path.stat().st_mode & 0o777 == 0o600

    reread = Outbox(path)
    assert [(e.msg_id, e.text, e.frame) for e in reread.listing()] == [
        ("m0", "text 0 \ud800 ünï", entries[0].frame), ("m2", "text 2 \ud800 ünï", entries[2].frame)]
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) < len(data)  # rewritten, live only
    reread.remove("m0")
    reread.remove("m2")
    assert path.read_bytes() == b""  # nothing left: emptied
    reread.close()

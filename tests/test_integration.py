"""Node and clients in one process, on eth-tester: real sockets, real EVM."""
from __future__ import annotations

import queue
import socket
import time

import pytest

from conftest import collecting_events, make_users, wait_until
from dm import datadir, wire
from dm.chain import ethereum
from dm.client.core import ClientError, Incoming
from helpers import OPAQUE_ENVELOPE, login


@pytest.mark.parametrize("pay", ["single", "book"])
def test_a_paid_message_moves_exactly_one_btk_from_sender_to_node(tester_node, pay):
    make_users(tester_node.data_dir, "alice", "bob")
    token = tester_node.node.token
    alice_inbox, alice_receipts, alice_paid, alice_events = collecting_events()
    bob_inbox, _, _, bob_events = collecting_events()
    tester_node.client("bob", bob_events)
    alice = tester_node.client("alice", alice_events, pay=pay, book_size=5)
    node_before = token.balance_of(tester_node.address)
    alice_before = token.balance_of(alice.eth_address)

    msg_id = alice.send_text("bob", "hello bob, this is alice")
    incoming: Incoming = bob_inbox.get(timeout=10)
    assert (incoming.sender, incoming.text, incoming.genuine) == ("alice", "hello bob, this is alice", True)
    wait_until(lambda: alice_paid == [msg_id], message="the paid notice")
    assert alice_receipts[msg_id] == "delivered"
    assert token.balance_of(tester_node.address) - node_before == ethereum.TOKEN
    if pay == "single":
        assert alice_before - token.balance_of(alice.eth_address) == ethereum.TOKEN
    else:  # the book escrowed 5; one leaf paid the node and 4 stay refundable
        book = token.book(alice.eth_address, alice.payer._book.root)
        assert (book.size, book.spent) == (5, 1)
        assert alice_before - token.balance_of(alice.eth_address) == 5 * ethereum.TOKEN


def test_offline_recipient_is_reported_and_nothing_is_spent(tester_node):
    make_users(tester_node.data_dir, "alice", "bob")
    _, receipts, _, events = collecting_events()
    queued = []
    events.queued = lambda msg_id, peer: queued.append((msg_id, peer))
    bob = tester_node.client("bob")
    bob.close()
    alice = tester_node.client("alice", events, pay="single")
    wait_until(lambda: "bob" not in alice.peers(), message="bob to go offline")
    msg_id = alice.send_text("bob", "are you there?")
    wait_until(lambda: queued == [(msg_id, "bob")], message="the offline notice")  # it waits for bob
    assert msg_id not in receipts and [e.msg_id for e in alice.queue()] == [msg_id]
    code_hash = bytes.fromhex(alice.last_bounty["code_hash"])
    assert tester_node.node.token.bounty(alice.eth_address, code_hash).state == "open"  # refundable after expiry


def test_unpaid_message_is_refused_with_a_clear_error(tester_node):
    make_users(tester_node.data_dir, "alice", "bob")
    inbox, receipts, _, events = collecting_events()
    bob_inbox, _, _, bob_events = collecting_events()
    tester_node.client("bob", bob_events)
    alice = tester_node.client("alice", events)
    details = {}
    alice.events.receipt = lambda msg_id, status, detail: details.__setitem__(msg_id, (status, detail))
    # A bounty hash nobody registered: the node must not relay it.
    alice._write({"type": "send", "to": "bob", "msg_id": "fake-1", "bounty": {"code_hash": "11" * 32},
                  "envelope": OPAQUE_ENVELOPE})
    alice.outstanding["fake-1"] = object()
    wait_until(lambda: "fake-1" in details, message="the refusal")
    status, detail = details["fake-1"]
    assert status == "refused" and "unpaid" in detail
    with pytest.raises(queue.Empty):
        bob_inbox.get(timeout=0.5)


def test_messages_from_three_senders_route_by_name(tester_node):
    make_users(tester_node.data_dir, "a", "b", "c")
    inboxes = {}
    clients = {}
    for name in ("a", "b", "c"):
        inbox, _, _, events = collecting_events()
        inboxes[name] = inbox
        clients[name] = tester_node.client(name, events, book_size=10)
    clients["a"].send_text("b", "a to b")
    clients["b"].send_text("c", "b to c")
    clients["c"].send_text("a", "c to a")
    got = {name: inboxes[name].get(timeout=10) for name in inboxes}
    assert (got["b"].sender, got["b"].text) == ("a", "a to b")
    assert (got["c"].sender, got["c"].text) == ("b", "b to c")
    assert (got["a"].sender, got["a"].text) == ("c", "c to a")


def test_a_forged_sender_is_not_shown_as_genuine(tester_node):
    """mallory signs with her own key but claims to be alice inside the envelope."""
    make_users(tester_node.data_dir, "alice", "bob", "mallory")
    bob_inbox, _, _, bob_events = collecting_events()
    tester_node.client("alice")
    tester_node.client("bob", bob_events)
    mallory = tester_node.client("mallory", book_size=3)
    from dm import crypto

    bounty = mallory.payer.next_bounty()
    envelope = crypto.seal({"text": "send money"}, sender="alice", recipient="bob", code=bounty.code,
                              sender_key=mallory.rsa_key, recipient_public_key=mallory.peer_key("bob"))
    mallory._write({"type": "send", "to": "bob", "msg_id": envelope["msg_id"], "bounty": bounty.wire,
                    "envelope": envelope})
    incoming = bob_inbox.get(timeout=10)
    assert incoming.sender == "mallory" and not incoming.genuine and incoming.text == ""


def test_a_replayed_envelope_is_reported_not_shown(tester_node):
    """While bob's claim of a message is remembered (the claim timeout), the node refuses
    another message to him under its msg_id; after that it relays a second copy (it keeps
    no message), and the recipient's replay guard must catch it."""
    make_users(tester_node.data_dir, "alice", "bob")
    bob_inbox, _, _, bob_events = collecting_events()
    _, _, alice_paid, alice_events = collecting_events()
    tester_node.client("bob", bob_events)
    alice = tester_node.client("alice", alice_events, book_size=4)
    sent = []
    original_write = alice._write_raw

    def capture(data):
        sent.extend(wire.parse(p) for p in wire.FrameDecoder().feed(data))
        original_write(data)

    alice._write_raw = capture
    msg_id = alice.send_text("bob", "pay once")
    first = bob_inbox.get(timeout=10)
    assert first.genuine
    wait_until(lambda: msg_id in alice_paid, message="the first copy to be claimed and paid")
    original_write(wire.encode(dict(sent[-1], bounty=alice.payer.next_bounty().wire)))  # same envelope, fresh bounty
    with pytest.raises(queue.Empty):
        bob_inbox.get(timeout=1)
    ledger = tester_node.node.ledger
    ledger.forget_settled(time.monotonic() + ledger.claim_timeout + 1)  # past the claim timeout
    original_write(wire.encode(dict(sent[-1], bounty=alice.payer.next_bounty().wire)))
    second = bob_inbox.get(timeout=10)
    assert not second.genuine and "replay" in second.problem.lower()


def test_unknown_peer_gives_a_clear_error(tester_node):
    make_users(tester_node.data_dir, "alice")
    alice = tester_node.client("alice")
    with pytest.raises(ClientError, match="no user 'nobody'"):
        alice.send_text("nobody", "hello?")


def test_send_in_any_key_order_is_relayed_and_the_fast_path_keeps_every_check(tester_node):
    """Canonical sends take the node's header-only path; any other key order takes the
    general one. Both deliver the same message; both refuse an unpaid or reused bounty."""
    make_users(tester_node.data_dir, "alice", "bob")
    bob_inbox, _, _, bob_events = collecting_events()
    tester_node.client("bob", bob_events)
    details = {}
    alice = tester_node.client("alice", book_size=4)
    alice.events.receipt = lambda msg_id, status, detail: details.__setitem__(msg_id, (status, detail))
    from dm import crypto

    def frame_for(text, bounty, reorder):
        envelope = crypto.seal({"text": text}, sender="alice", recipient="bob", code=bounty.code,
                                  sender_key=alice.rsa_key, recipient_public_key=alice.peer_key("bob"))
        message = {"type": "send", "to": "bob", "msg_id": envelope["msg_id"], "bounty": bounty.wire,
                   "envelope": envelope}
        if reorder:
            message = {"envelope": envelope, "bounty": bounty.wire, "msg_id": envelope["msg_id"], "to": "bob",
                       "type": "send"}
        alice.outstanding[envelope["msg_id"]] = object()
        return message, wire.encode(message)

    first = alice.payer.next_bounty()
    _, canonical = frame_for("canonical", first, reorder=False)
    _, shuffled = frame_for("shuffled", alice.payer.next_bounty(), reorder=True)
    alice._write_raw(canonical + shuffled)
    texts = {bob_inbox.get(timeout=10).text, bob_inbox.get(timeout=10).text}
    assert texts == {"canonical", "shuffled"}
    reused, reused_frame = frame_for("reused bounty", first, reorder=False)
    unpaid_bounty = type(first)({"book": "22" * 32, "index": 0}, b"\0" * 32)
    unpaid, unpaid_frame = frame_for("unpaid", unpaid_bounty, reorder=False)
    alice._write_raw(reused_frame + unpaid_frame)
    wait_until(lambda: reused["msg_id"] in details and unpaid["msg_id"] in details, message="two refusals")
    assert details[reused["msg_id"]][0] == "refused" and "already paid" in details[reused["msg_id"]][1]
    assert details[unpaid["msg_id"]][0] == "refused" and "unpaid" in details[unpaid["msg_id"]][1]
    with pytest.raises(queue.Empty):
        bob_inbox.get(timeout=0.5)


def test_pins_survive_a_restart_and_a_torn_last_line(tmp_path):
    from dm.relay.pins import PinStore

    path = tmp_path / "pins.json"
    store = PinStore(path)
    assert store.pin("alice", "KEY-A", "0xA") == "new"
    assert store.pin("bob", "KEY-B", "0xB") == "new"
    assert store.pin("alice", "KEY-A", "0xA2") == "moved"
    assert store.pin("alice", "KEY-A", "0xA2") == "same"
    assert store.pin("alice", "KEY-EVIL", "0xE") == "conflict"
    store.close()
    with open(path.with_suffix(".jsonl"), "a") as log:
        log.write('{"name": "carol", "public_k')  # a crash mid-write
    again = PinStore(path)
    assert again.get("alice") == {"public_key": "KEY-A", "eth_address": "0xA2"}
    assert again.get("bob")["public_key"] == "KEY-B" and "carol" not in again
    assert again.pin("alice", "KEY-EVIL", "0xE") == "conflict"
    again.close()


def test_a_message_too_long_for_one_frame_is_refused_before_anything_is_paid(tester_node):
    from dm.client.core import MAX_TEXT_BYTES

    make_users(tester_node.data_dir, "alice", "bob")
    tester_node.client("bob")
    alice = tester_node.client("alice", book_size=3)
    alice.send_text("bob", "open the book")  # the first send opens a book
    assert alice.wait_acknowledged(timeout=10)
    cursor = alice.payer._cursor
    with pytest.raises(ClientError, match="the limit is"):
        alice.send_text("bob", "x" * (MAX_TEXT_BYTES + 1))
    assert alice.payer._cursor == cursor and not alice.outstanding


def test_a_restarted_sender_never_reuses_a_code_of_its_book(tester_node):
    """The book's cursor is saved ahead of use, so a sender that crashes and comes
    back resumes past every code it may have handed out."""
    make_users(tester_node.data_dir, "alice", "bob")
    tester_node.client("bob")
    first = tester_node.client("alice", book_size=100)
    first.send_many("bob", ["one", "two", "three"])
    assert first.wait_acknowledged(timeout=10)
    root, used = first.payer._book.root, first.payer._cursor
    first.sock.close()  # no clean shutdown
    again = tester_node.client("alice", book_size=100)
    assert again.payer._book.root == root and again.payer._cursor >= used
    bounty = again.payer.next_bounty()
    assert bounty.wire["index"] >= used


def test_refund_takes_back_the_single_bounties_no_delivery_earned(tester_node, capsys):
    """`--pay single` registers one bounty per message. One whose code never came back was
    escrowed for good: the client kept no record of it and `main.py refund` looked at books
    only (an attacker audit: alice stayed 1 BTK short after expiry). The client now records
    each bounty's hash and expiry, and refund takes back those that are open and expired."""
    from dm.cli import main as main_cli

    data_dir, token = tester_node.data_dir, tester_node.node.token
    make_users(data_dir, "alice", "bob", "carol")
    _, _, _, bob_events = collecting_events()
    tester_node.client("bob", bob_events)
    with socket.create_connection(("127.0.0.1", tester_node.port), timeout=10) as carol:  # reads, never claims
        assert login(carol, data_dir, "carol")["type"] == "welcome"
        _, receipts, paid, alice_events = collecting_events()
        alice = tester_node.client("alice", alice_events, pay="single", expiry_seconds=120)
        earned = alice.send_text("bob", "read and paid")
        unearned = alice.send_text("carol", "delivered, never claimed")
        wait_until(lambda: earned in paid and receipts.get(unearned) == "delivered", message="bob's claim paid")
    record = data_dir / "clients" / "alice" / "bounties.jsonl"
    assert len(record.read_text().splitlines()) == 2 and record.stat().st_mode & 0o777 == 0o600
    signer = ethereum.Signer(token.w3, datadir.read_eth_key(datadir.eth_key_path(data_dir, "alice")))
    address, client_dir = signer.address, data_dir / "clients" / "alice"
    before = token.balance_of(address)

    assert main_cli.refund_all(token, signer, client_dir) == 0  # not expired yet: nothing back
    assert token.balance_of(address) == before and len(record.read_text().splitlines()) == 1
    w3 = token.w3
    w3.provider.ethereum_tester.time_travel(w3.eth.get_block("latest")["timestamp"] + 600)
    assert main_cli.refund_all(token, signer, client_dir) == 0
    assert token.balance_of(address) - before == ethereum.TOKEN
    assert "refunded 1 BTK" in capsys.readouterr().out
    assert record.read_text() == ""

"""Fair pay: a bounty pays only for its own sender's messages (issue 10, defect 2).

Every recipient, and every member of a channel one posts in, sees the sender's book root
and leaf index in `deliver`. Before this, anyone could send their own traffic on someone
else's next leaves: the node relayed it, and the owner's own messages were then refused.
"""
from __future__ import annotations

import contextlib
import secrets
import socket
import time

import pytest

from conftest import logged_in_sockets, wait_until
from dm import crypto, datadir, wire
from dm.chain import ethereum
from dm.chain.books import keccak
from dm.chain.faucet import faucet_signer, fund_user
from helpers import OPAQUE_ENVELOPE, login
from test_abuse import read_frame
from test_relay_burst import open_announced_book, send_frame


@pytest.fixture
def trio(tester_node):
    with logged_in_sockets(tester_node.port, tester_node.data_dir, "alice", "bob", "carol") as socks:
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
    socks["bob"].sendall(wire.encode({"type": "send", "envelope": OPAQUE_ENVELOPE, "to": "carol", "msg_id": "b2",
                                      "bounty": {"book": "0x" + root.upper(), "index": 1}}))
    refusal = read_frame(socks["bob"])
    assert refusal["code"] == "unpaid" and refusal["ref"] == "b2"
    with pytest.raises(TimeoutError):
        read_frame(socks["carol"], timeout=0.5)

    # alice's own next leaf is untouched
    socks["alice"].sendall(send_frame("bob", "a1", root, 1))
    assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "a1", "status": "delivered"}
    assert read_frame(socks["bob"])["msg_id"] == "a1"


def count_chain_calls(monkeypatch, w3) -> list:
    """Every JSON-RPC call the node makes from now on (the real provider still answers)."""
    calls: list = []
    provider, real = w3.provider, w3.provider.make_request

    def counted(method, params):
        calls.append(method)
        return real(method, params)

    monkeypatch.setattr(provider, "make_request", counted)
    monkeypatch.setattr(provider, "_request_func_cache", (None, None))  # rebuilt around `counted`
    return calls


def test_a_flood_of_unknown_single_bounties_costs_no_chain_call_per_frame(extra_nodes, data_dir, monkeypatch):
    """Each send naming a made-up code hash used to cost the node one RPC round trip
    (88 a second saturated a core). Now direct lookups have a budget per second (the
    --lookups limit, 5 here); past it a miss catches up with the chain's events at most once
    per MISS_SYNC_SECONDS, whatever the number of frames. (max_errors is raised so that one
    connection can carry the whole flood.)"""
    node = extra_nodes("flood", max_errors=10_000, lookups_per_second=5)
    with logged_in_sockets(node.port, data_dir, "bob", "carol") as socks:
        calls = count_chain_calls(monkeypatch, node.token.w3)
        node.token.w3.eth.block_number  # the counter sees the node's provider
        assert calls
        calls.clear()
        flood = 300
        started = time.monotonic()
        socks["bob"].sendall(b"".join(wire.encode({"type": "send", "to": "carol", "msg_id": f"u{i}",
                                                   "bounty": {"code_hash": secrets.token_hex(32)},
                                                   "envelope": OPAQUE_ENVELOPE}) for i in range(flood)))
        answers = [read_frame(socks["bob"], timeout=20) for _ in range(flood)]
        elapsed = time.monotonic() - started
    assert {(a["type"], a["code"]) for a in answers} == {("error", "unpaid")}
    assert node.index.lookups <= 5 * (elapsed + 1)  # the budget held
    assert len(calls) < flood / 5, (len(calls), node.index.lookups, node.index.miss_syncs, elapsed)


def test_a_connection_whose_frames_are_all_answered_is_not_cut_by_the_frame_timeout(trio, monkeypatch):
    """While the node takes its time over pipelined frames (here: a chain that answers each call in 50 ms,
    and a send naming an unknown bounty after each catch-up), the half frame the client sent
    behind them must not count as a slow client: its clock starts once the node has answered."""
    node, socks = trio
    provider = node.node.token.w3.provider
    real = provider.make_request

    def slow_chain(method, params):
        time.sleep(0.05)
        return real(method, params)

    monkeypatch.setattr(provider, "make_request", slow_chain)
    monkeypatch.setattr(provider, "_request_func_cache", (None, None))  # rebuilt around slow_chain
    count = node.node.max_errors - 1  # refusals in a row, short of the limit
    sends = b"".join(wire.encode({"type": "send", "to": "carol", "msg_id": f"s{i}",
                                  "bounty": {"code_hash": secrets.token_hex(32)}, "envelope": OPAQUE_ENVELOPE})
                     for i in range(count))
    ping = wire.encode({"type": "ping"})
    started = time.monotonic()
    socks["bob"].sendall(sends + ping[:5])  # one read: the sends, then half a ping
    answers = [read_frame(socks["bob"], timeout=60) for _ in range(count)]
    assert time.monotonic() - started > node.node.server.frame_timeout, "too fast for this test to mean anything"
    assert all(a is not None and a["code"] == "unpaid" for a in answers), answers[-1]
    socks["bob"].sendall(ping[5:])
    assert read_frame(socks["bob"], timeout=5) == {"type": "pong"}


def _signer(node, data_dir, name: str) -> ethereum.Signer:
    token = node.token
    signer = ethereum.Signer(token.w3, datadir.read_secret(datadir.eth_key_path(data_dir, name)))
    fund_user(token, faucet_signer(token.w3, data_dir), signer.address)
    return signer


def _single_send(to: str, msg_id: str, code_hash: bytes) -> bytes:
    return wire.encode({"type": "send", "to": to, "msg_id": msg_id, "bounty": {"code_hash": code_hash.hex()},
                        "envelope": OPAQUE_ENVELOPE})


def test_a_copied_bounty_hash_sent_first_does_not_block_its_owner(trio):
    """Bounties are keyed by (sender, hash) on chain, so anyone may register a hash someone else
    registered (it is public in the event) and send on it first. The node used to key what a
    bounty carried by the hash alone: the copy took it, and the owner's message was refused
    ("that bounty already paid for another message"). Each account's bounty carries its own
    message; the code pays the owner's bounty only."""
    node, socks = trio
    alice, bob = _signer(node.node, node.data_dir, "alice"), _signer(node.node, node.data_dir, "bob")
    token, relayer = node.node.token, node.node.signer.address
    expiry = token.w3.eth.get_block("latest")["timestamp"] + 86_400
    code = secrets.token_bytes(32)
    code_hash = keccak(code)
    token.register(alice, code_hash, relayer, expiry)
    token.register(bob, code_hash, relayer, expiry)  # bob copied it from alice's BountyRegistered event

    socks["bob"].sendall(_single_send("carol", "bob-1", code_hash))  # bob's own bounty: relayed, his to pay
    assert read_frame(socks["bob"]) == {"type": "receipt", "msg_id": "bob-1", "status": "delivered"}
    assert read_frame(socks["carol"])["msg_id"] == "bob-1"

    socks["alice"].sendall(_single_send("carol", "alice-1", code_hash))
    assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "alice-1", "status": "delivered"}
    assert read_frame(socks["carol"])["msg_id"] == "alice-1"

    socks["carol"].sendall(wire.encode({"type": "claim", "msg_id": "alice-1", "code": code.hex()}))
    assert read_frame(socks["carol"])["type"] == "release"
    wait_until(lambda: token.bounty(alice.address, code_hash).state == "redeemed", message="alice's bounty to pay")
    assert token.bounty(bob.address, code_hash).state == "open"  # alice's code paid alice's bounty only
    # Once the code is known, bob's copy pays for bob's own message when it is read: each
    # account's bounty pays once, for that account's message.
    socks["carol"].sendall(wire.encode({"type": "claim", "msg_id": "bob-1", "code": code.hex()}))
    assert read_frame(socks["carol"])["type"] == "release"
    wait_until(lambda: token.bounty(bob.address, code_hash).state == "redeemed", message="bob's bounty to pay")
    assert token.balance_of(relayer) == 2 * ethereum.TOKEN


def test_a_message_sent_before_its_sender_moved_to_another_account_is_paid_from_the_old_one(trio):
    """A name keeps its RSA key but may log in with another Ethereum account (the pin "moves").
    The claim used to look the payer up in the pins at claim time: a code returned after the
    move named the new account, whose bounty does not exist, so the message that was read was
    never paid. The delivery now records the account whose bounty carried it."""
    node, socks = trio
    alice = _signer(node.node, node.data_dir, "alice")
    token, relayer = node.node.token, node.node.signer.address
    code = secrets.token_bytes(32)
    code_hash = keccak(code)
    token.register(alice, code_hash, relayer, token.w3.eth.get_block("latest")["timestamp"] + 86_400)
    socks["alice"].sendall(_single_send("bob", "before-move", code_hash))
    assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "before-move", "status": "delivered"}
    assert read_frame(socks["bob"])["msg_id"] == "before-move"

    socks["alice"].close()
    key_path = datadir.eth_key_path(node.data_dir, "alice")
    key_path.unlink()
    datadir.write_secret(key_path, "0x" + secrets.token_hex(32))  # a new account, same RSA key
    with contextlib.closing(socket.create_connection(("127.0.0.1", node.port), timeout=10)) as moved:
        assert login(moved, node.data_dir, "alice")["type"] == "welcome"
        assert node.node.pins.get("alice")["eth_address"] != alice.address

        socks["bob"].sendall(wire.encode({"type": "claim", "msg_id": "before-move", "code": code.hex()}))
        assert read_frame(socks["bob"])["type"] == "release"
        wait_until(lambda: token.bounty(alice.address, code_hash).state == "redeemed",
                   message="the old account's bounty to pay")


def test_a_code_returned_too_late_to_be_redeemed_opens_nothing(trio):
    """A code that comes back when its bounty is about to expire cannot be redeemed any more (the
    contract refuses an expired bounty), yet the node released the key for it: a recipient (or a
    pair colluding, with a book of short expiry) read messages that never paid. A claim now needs
    the bounty to outlive the node's redemption (--batch-wait plus a margin); otherwise it is
    refused `expired`, nothing is journaled, and the message stays sealed."""
    node, socks = trio
    book = open_announced_book(node.node, node.data_dir, socks["alice"], "alice", 2)
    socks["alice"].sendall(send_frame("bob", "late", book.root.hex(), 0))
    assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "late", "status": "delivered"}
    assert read_frame(socks["bob"])["msg_id"] == "late"

    expiry = node.node.index.bounty_expiry(("book", book.root.hex(), 0, node.node.pins.get("alice")["eth_address"]))
    node.node.index.clock = lambda: expiry - 5  # the book runs out in 5 s: too soon to redeem
    socks["bob"].sendall(wire.encode({"type": "claim", "msg_id": "late", "code": book.codes[0].hex()}))
    refusal = read_frame(socks["bob"])
    assert (refusal["type"], refusal["code"], refusal["ref"]) == ("error", "expired", "late"), refusal
    assert "send it again" in refusal["message"]
    journal = node.data_dir / "node" / "journal.jsonl"
    assert not journal.exists() or '"late"' not in journal.read_text()
    assert node.node.ledger.sent_waiting.get("alice", 0) == 0  # it no longer counts against alice's cap


def test_the_send_and_claim_expiry_margins_include_the_batch_wait(extra_nodes, data_dir):
    """A send needs EXPIRY_MARGIN plus --batch-wait left on its bounty, a claim REDEEM_MARGIN plus
    --batch-wait: a second either side of each bound decides (--batch-wait 5 here, so a margin
    without it would decide otherwise)."""
    from dm.relay.bounties import EXPIRY_MARGIN, REDEEM_MARGIN

    node = extra_nodes("margins", redeemer_options={"batch_size": 20, "batch_wait": 5.0})
    with logged_in_sockets(node.port, data_dir, "alice", "bob") as socks:
        _margins_decide(node, data_dir, socks, EXPIRY_MARGIN, REDEEM_MARGIN)


def _margins_decide(node, data_dir, socks, expiry_margin: float, redeem_margin: float) -> None:
    index, batch_wait = node.index, node.redeemer.batch_wait
    assert batch_wait == 5.0
    book = open_announced_book(node, data_dir, socks["alice"], "alice", 3)
    expiry = index.bounty_expiry(("book", book.root.hex(), 0, node.pins.get("alice")["eth_address"]))
    send_bound, claim_bound = expiry - expiry_margin - batch_wait, expiry - redeem_margin - batch_wait

    index.clock = lambda: send_bound + 1
    socks["alice"].sendall(send_frame("bob", "too-close", book.root.hex(), 0))
    refusal = read_frame(socks["alice"])
    assert (refusal["type"], refusal["code"], refusal["ref"]) == ("error", "unpaid", "too-close"), refusal
    index.clock = lambda: send_bound - 1
    socks["alice"].sendall(send_frame("bob", "in-time", book.root.hex(), 1))
    assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "in-time", "status": "delivered"}
    assert read_frame(socks["bob"])["msg_id"] == "in-time"

    index.clock = lambda: claim_bound - 1
    socks["bob"].sendall(wire.encode({"type": "claim", "msg_id": "in-time", "code": book.codes[1].hex()}))
    assert read_frame(socks["bob"])["type"] == "release"
    index.clock = lambda: send_bound - 1
    socks["alice"].sendall(send_frame("bob", "claimed-late", book.root.hex(), 2))
    assert read_frame(socks["alice"])["status"] == "delivered"
    assert read_frame(socks["bob"])["msg_id"] == "claimed-late"
    index.clock = lambda: claim_bound + 1
    socks["bob"].sendall(wire.encode({"type": "claim", "msg_id": "claimed-late", "code": book.codes[2].hex()}))
    assert read_frame(socks["bob"])["code"] == "expired"


def _answer_to(sock, msg_id: str) -> dict:
    """The receipt or error for `msg_id`; notices before it (`paid` for an earlier message) are skipped."""
    while True:
        frame = read_frame(sock)
        assert frame is not None, "the node hung up"
        if frame.get("msg_id") == msg_id or frame.get("ref") == msg_id:
            return frame


def test_one_hash_under_two_accounts_of_one_name_never_shares_a_layer_key(trio):
    """The same code hash registered by two accounts is two bounties, each carrying a message. A
    name that moved from one account to the other, sending the same msg_id on both, would have
    had both messages sealed under one key (the key was derived from sender, msg_id and hash):
    the key released for the first, paid message opened the second, never paid. The payer's
    account is part of the key's derivation now."""
    node, socks = trio
    token, relayer = node.node.token, node.node.signer.address
    first = _signer(node.node, node.data_dir, "alice")
    code = secrets.token_bytes(32)
    code_hash = keccak(code)
    expiry = token.w3.eth.get_block("latest")["timestamp"] + 86_400
    token.register(first, code_hash, relayer, expiry)
    socks["alice"].sendall(_single_send("bob", "same-id", code_hash))
    assert read_frame(socks["alice"])["status"] == "delivered"
    sealed_first = read_frame(socks["bob"])["envelope"]["ciphertext"]
    socks["bob"].sendall(wire.encode({"type": "claim", "msg_id": "same-id", "code": code.hex()}))
    released = read_frame(socks["bob"])["key"]

    socks["alice"].close()
    key_path = datadir.eth_key_path(node.data_dir, "alice")
    key_path.unlink()
    datadir.write_secret(key_path, "0x" + secrets.token_hex(32))
    second = _signer(node.node, node.data_dir, "alice")
    token.register(second, code_hash, relayer, expiry)
    with contextlib.closing(socket.create_connection(("127.0.0.1", node.port), timeout=10)) as moved:
        assert login(moved, node.data_dir, "alice")["type"] == "welcome"
        moved.sendall(_single_send("bob", "same-id", code_hash))
        # while bob's claim of that msg_id is remembered (for a re-claim), it names no other message to him
        refusal = _answer_to(moved, "same-id")
        assert (refusal["type"], refusal["code"], refusal["ref"]) == ("error", "bad_field", "same-id"), refusal
        ledger = node.node.ledger
        ledger.forget_settled(time.monotonic() + ledger.claim_timeout + 1)  # past the claim timeout
        moved.sendall(_single_send("bob", "same-id", code_hash))
        assert _answer_to(moved, "same-id")["status"] == "delivered"
    sealed_second = read_frame(socks["bob"])["envelope"]["ciphertext"]
    assert sealed_second != sealed_first  # the same end-to-end ciphertext, under another key
    with pytest.raises(crypto.WrongRelease):
        crypto.open_node_layer(bytes.fromhex(released), sealed_second)

"""The node's hot path: many `send` frames arriving in one read.

The node relays a run of plain, book-paid sends without taking a lock and
hands anything unusual to the general path. These tests write whole bursts
in one sendall, with bad frames in the middle, and check that every frame
gets exactly the answer it would get alone, in order, over real sockets.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading

import pytest

from conftest import make_users, wait_until
from dm import datadir, wire
from dm.chain import ethereum
from dm.chain.books import BookSecrets
from dm.relay.session import Session
from dm.wire.send import deliver_prefix
from dm.chain.faucet import faucet_signer, fund_user
from dm.relay import server as relay_server
from helpers import OPAQUE_ENVELOPE, Transport
from test_abuse import connect, raw_login, read_frame

# The node never opens an envelope; this one has the canonical shape, so these bursts take the fast reader.
ENVELOPE = OPAQUE_ENVELOPE


def send_frame(to: str, msg_id: str, root: str, index: int, **extra) -> bytes:
    """A `send` in the canonical key order clients use."""
    return wire.encode({"type": "send", "to": to, "msg_id": msg_id,
                            "bounty": {"book": root, "index": index}, **extra, "envelope": ENVELOPE})


def open_announced_book(node, data_dir, sock, name: str, size: int) -> BookSecrets:
    """Open a real book on chain for `name`, bound to the node, and announce its leaves."""
    token = node.token
    signer = ethereum.Signer(token.w3, datadir.read_secret(datadir.eth_key_path(data_dir, name)))
    fund_user(token, faucet_signer(token.w3, data_dir), signer.address)
    book = BookSecrets.generate(size)
    now = token.w3.eth.get_block("latest")["timestamp"]
    token.open_book(signer, book.root, size, node.signer.address, now + 86_400)
    node.index.sync()
    sock.sendall(wire.encode({"type": "book", "root": book.root.hex(),
                                  "leaves": [leaf.hex() for leaf in book.leaf_hashes]}))
    assert read_frame(sock, timeout=10) == {"type": "book", "root": book.root.hex(), "size": size}
    return book


def read_frames(sock: socket.socket, count: int, timeout: float = 10) -> list[dict]:
    frames = []
    while len(frames) < count:
        frame = read_frame(sock, timeout=timeout)
        assert frame is not None, f"the node hung up after {len(frames)} of {count} frames"
        frames.append(frame)
    return frames


def in_order(frames: list[dict]) -> list[tuple[str, str]]:
    """(msg_id, 'delivered' / 'offline') for receipts, (ref, error code) for errors."""
    return [(f["msg_id"], f["status"]) if f["type"] == "receipt" else (f["ref"], f["code"]) for f in frames]


def answers_by_ref(frames: list[dict]) -> dict[str, str]:
    """msg_id -> 'delivered' / 'offline' (receipts) or the error code."""
    out = {}
    for frame in frames:
        if frame["type"] == "receipt":
            out[frame["msg_id"]] = frame["status"]
        else:
            assert frame["type"] == "error", frame
            out[frame["ref"]] = frame["code"]
    return out


@pytest.fixture
def logged_in(tester_node):
    """Raw authenticated sockets by name."""
    with contextlib.ExitStack() as stack:
        def login(*names: str) -> list[socket.socket]:
            make_users(tester_node.data_dir, *[n for n in names
                                               if not datadir.private_key_path(tester_node.data_dir, n).exists()])
            socks = []
            for name in names:
                sock = connect(tester_node.port, stack, timeout=10)
                assert raw_login(sock, tester_node.data_dir, name)["type"] == "welcome"
                socks.append(sock)
            return socks
        yield login


def test_a_burst_with_bad_frames_in_the_middle_gets_one_right_answer_per_frame(tester_node, logged_in):
    node, data_dir = tester_node.node, tester_node.data_dir
    make_users(data_dir, "carol")  # known to the node once she logs in, then offline
    (carol,) = logged_in("carol")
    carol.close()
    wait_until(lambda: "carol" not in node.online, message="carol offline")
    alice, bob = logged_in("alice", "bob")
    book = open_announced_book(node, data_dir, alice, "alice", 8)
    root = book.root.hex()

    reordered = json.dumps({"type": "send", "envelope": ENVELOPE, "to": "bob", "msg_id": "m6",
                            "bounty": {"index": 4, "book": root}}).encode()
    burst = b"".join([
        send_frame("bob", "m1", root, 0),
        send_frame("bob", "m2", root, 1),
        send_frame("bob", "m3", root, 1),          # the same leaf again: unpaid
        send_frame("nobody", "m4", root, 2),       # never seen by the node
        send_frame("bob", "m1", root, 3),          # a msg_id still pending
        wire.frame(reordered),                 # another key order: the general path
        send_frame("bob", "m7", root, 5),
        send_frame("carol", "m8", root, 6),        # pinned but offline: leaf 6 stays unused
        send_frame("bob", "m9", root, 99),         # beyond the book
        send_frame("bob", "m10", "0x" + root.upper(), 7),  # the same book, spelled differently
    ])
    alice.sendall(burst)

    assert in_order(read_frames(alice, 10)) == [
        ("m1", "delivered"), ("m2", "delivered"), ("m3", "unpaid"), ("m4", "unknown_peer"), ("m1", "bad_field"),
        ("m6", "delivered"), ("m7", "delivered"), ("m8", "offline"), ("m9", "unpaid"), ("m10", "delivered")]
    frames = read_frames(bob, 5)
    assert [f["msg_id"] for f in frames] == ["m1", "m2", "m6", "m7", "m10"]
    # Relayed as sent, but for the ciphertext, which goes out under the node's layer.
    assert all(f["type"] == "deliver" and f["from"] == "alice" and f["envelope"]["ciphertext"] != ENVELOPE["ciphertext"]
               and {**f["envelope"], "ciphertext": ENVELOPE["ciphertext"]} == ENVELOPE for f in frames)
    assert [f["bounty"]["index"] for f in frames] == [0, 1, 4, 5, 7]

    # The leaf of the offline message is still good; the leaf bob got is paid once: a repeated
    # claim (a re-claim, tests/test_reclaim.py) gets the same release and is journaled once.
    alice.sendall(send_frame("bob", "m11", root, 6))
    assert read_frame(alice) == {"type": "receipt", "msg_id": "m11", "status": "delivered"}
    assert read_frame(bob)["msg_id"] == "m11"
    bob.sendall(wire.encode({"type": "claim", "msg_id": "m2", "code": book.codes[1].hex()}))
    bob.sendall(wire.encode({"type": "claim", "msg_id": "m2", "code": book.codes[1].hex()}))
    paid_by = ("book", root, 1, node.pins.get("alice")["eth_address"])
    release = {"type": "release", "msg_id": "m2", "key": node.layer.key("alice", "m2", paid_by).hex()}
    assert read_frames(bob, 2) == [release, release]
    journal = (data_dir / "node" / "journal.jsonl").read_text()
    assert sum(json.loads(line)["msg_id"] == "m2" for line in journal.splitlines()
               if json.loads(line)["op"] == "claim") == 1


def test_every_frame_of_a_burst_is_answered_in_order(tester_node, logged_in):
    """Receipts and errors come back in the order the frames were sent."""
    node, data_dir = tester_node.node, tester_node.data_dir
    alice, bob = logged_in("alice", "bob")
    root = open_announced_book(node, data_dir, alice, "alice", 6).root.hex()
    alice.sendall(b"".join([
        send_frame("bob", "a", root, 0),
        send_frame("bob", "b", root, 0),
        send_frame("bob", "c", root, 1),
        send_frame("nobody", "d", root, 2),
        send_frame("bob", "e", root, 3),
    ]))
    assert in_order(read_frames(alice, 5)) == [
        ("a", "delivered"), ("b", "unpaid"), ("c", "delivered"), ("d", "unknown_peer"), ("e", "delivered")]
    assert [f["msg_id"] for f in read_frames(bob, 3)] == ["a", "c", "e"]


def test_only_messages_that_go_out_are_sealed(tester_node, logged_in):
    """Sealing costs the node CPU in proportion to the message's size (up to 6 MB), and an
    unpaid, refused or undeliverable send is free for its sender: the node rules first and
    seals only what it relays, so a flood of big sends to an offline user costs no seal."""
    node, data_dir = tester_node.node, tester_node.data_dir
    make_users(data_dir, "carol")
    (carol,) = logged_in("carol")
    carol.close()
    wait_until(lambda: "carol" not in node.online, message="carol offline")
    alice, bob = logged_in("alice", "bob")
    root = open_announced_book(node, data_dir, alice, "alice", 4).root.hex()
    sealed = []
    real_seal = node.layer.seal
    node.layer.seal = lambda *args: sealed.append(args[1]) or real_seal(*args)
    big = {**ENVELOPE, "ciphertext": "QUJD" * 250_000}  # 1 MB
    alice.sendall(b"".join([
        wire.encode({"type": "send", "to": "carol", "msg_id": "offline", "bounty": {"book": root, "index": 0},
                     "envelope": big}),
        wire.encode({"type": "send", "to": "nobody", "msg_id": "unknown", "bounty": {"book": root, "index": 1},
                     "envelope": big}),
        wire.encode({"type": "send", "to": "bob", "msg_id": "unpaid", "bounty": {"book": root, "index": 99},
                     "envelope": big}),
        wire.frame(json.dumps({"type": "send", "envelope": big, "to": "carol", "msg_id": "offline-general",
                               "bounty": {"index": 1, "book": root}}).encode()),
        send_frame("bob", "relayed", root, 2),
    ]))
    assert in_order(read_frames(alice, 5)) == [("offline", "offline"), ("unknown", "unknown_peer"),
                                               ("unpaid", "unpaid"), ("offline-general", "offline"),
                                               ("relayed", "delivered")]
    assert [f["msg_id"] for f in read_frames(bob, 1)] == ["relayed"]
    assert sealed == ["relayed"]


def test_two_sessions_racing_for_the_same_leaves_get_each_one_delivered_once(relay_hub, data_dir):
    """The relay step reserves a bounty without a lock; two sessions sending the same 300 leaves
    at once, on two threads, must still get each leaf through exactly once. A book pays only for
    its owner, so both racers are alice: two sessions of one name, as during a reconnect.
    (A tiny switch interval makes the threads interleave between any two bytecodes.)"""
    node, _ = relay_hub
    shared, own = 300, 30
    w3 = node.token.w3
    alice = ethereum.Signer(w3, datadir.read_secret(datadir.eth_key_path(data_dir, "alice")))
    book = BookSecrets.generate(shared + 2 * own)
    token = node.token
    token.open_book(alice, book.root, book.size, node.signer.address, w3.eth.get_block("latest")["timestamp"] + 86_400)
    node.index.sync()
    assert node.index.announce_book(alice.address, book.root, book.leaf_hashes) is not None
    root = book.root.hex()
    # Each racer loses about 300 races within one burst: refusals the sliding error window
    # (max_errors per error_window) would close on. The race is what this test is about, so the
    # window is widened, as test_fair_pay does for its flood.
    node.max_errors = 10_000
    bob = Session(node, Transport("bob"), now=0.0)
    bob.name, bob.phase = "bob", "ready"
    node.online["bob"] = bob
    racers = {}
    for label in ("first", "second"):
        racer = Session(node, Transport(label), now=0.0)
        racer.name, racer.phase, racer.eth_address = "alice", "ready", alice.address
        racer._deliver_prefix = deliver_prefix("alice")
        racers[label] = racer

    def burst(label: str, own_leaves: range) -> bytes:
        frames = []
        for i in range(shared):
            frames.append(send_frame("bob", f"{label}-{i}", root, i))
            if i % 10 == 9:  # a leaf only this racer uses
                frames.append(send_frame("bob", f"{label}-own-{i}", root, own_leaves[i // 10]))
        return b"".join(frames)

    bursts = {"first": burst("first", range(shared, shared + own)),
              "second": burst("second", range(shared + own, shared + 2 * own))}
    threads = [threading.Thread(target=racers[label].receive, args=(bursts[label], 1.0)) for label in racers]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    answers = {label: answers_by_ref(wire.MessageDecoder().feed_messages(racer.transport.take()))
               for label, racer in racers.items()}
    assert all(len(a) == shared + own for a in answers.values()), "a racer was not answered for every frame"
    winners = [i for i in range(shared) for label in racers if answers[label][f"{label}-{i}"] == "delivered"]
    assert sorted(winners) == list(range(shared))  # every shared leaf once, none twice
    assert {code for who in answers.values() for code in who.values()} <= {"delivered", "unpaid"}
    got = wire.MessageDecoder().feed_messages(bob.transport.take())
    assert sorted(f["bounty"]["index"] for f in got) == list(range(shared + 2 * own))


def test_the_node_counts_what_it_relayed(tester_node, logged_in):
    node, data_dir = tester_node.node, tester_node.data_dir
    alice, bob = logged_in("alice", "bob")
    root = open_announced_book(node, data_dir, alice, "alice", 4).root.hex()
    before = node.relayed
    alice.sendall(b"".join(send_frame("bob", f"n{i}", root, i) for i in range(4)))
    read_frames(alice, 4)
    assert node.relayed == before + 4
    alice.close()
    wait_until(lambda: "alice" not in node.online, message="alice gone")
    assert node.relayed == before + 4  # a closed connection's count is kept


def test_claimed_deliveries_leave_the_node_s_memory_but_their_bounties_stay_used(tester_node, logged_in):
    """At 100,000 messages/s the node cannot keep every delivery for the hour a code may
    take: a claimed one is dropped at the next watchdog tick, its bounty kept as used."""
    node, data_dir = tester_node.node, tester_node.data_dir
    alice, bob = logged_in("alice", "bob")
    book = open_announced_book(node, data_dir, alice, "alice", 5)
    root = book.root.hex()
    alice.sendall(b"".join(send_frame("bob", f"c{i}", root, i) for i in range(5)))
    assert {status for _, status in in_order(read_frames(alice, 5))} == {"delivered"}
    read_frames(bob, 5)
    bob.sendall(b"".join(wire.encode({"type": "claim", "msg_id": f"c{i}", "code": book.codes[i].hex()})
                         for i in range(4)))  # c4 stays unclaimed
    wait_until(lambda: [entry[0] for entry in node.ledger.expiring] == ["c4"], timeout=5,
               message="claimed deliveries dropped, the unclaimed one kept")
    assert list(node.ledger.pending) == ["c4"]
    alice.sendall(send_frame("bob", "again", root, 2))
    assert in_order([read_frame(alice)]) == [("again", "unpaid")]


def test_the_log_sums_up_relaying_every_interval(extra_nodes, data_dir, monkeypatch, caplog):
    monkeypatch.setattr(relay_server, "RELAY_REPORT_SECONDS", 0.5)
    node = extra_nodes("relay-log")
    make_users(data_dir, "alice", "bob")
    caplog.set_level(logging.INFO, logger="node")
    with contextlib.ExitStack() as stack:
        alice, bob = (connect(node.port, stack, timeout=10) for _ in range(2))
        for sock, name in ((alice, "alice"), (bob, "bob")):
            assert raw_login(sock, data_dir, name)["type"] == "welcome"
        root = open_announced_book(node, data_dir, alice, "alice", 3).root.hex()
        alice.sendall(b"".join(send_frame("bob", f"l{i}", root, i) for i in range(3)))
        read_frames(alice, 3)
        wait_until(lambda: any("relayed 3 message(s) in the last 0.5s, 3 this run" in record.getMessage()
                               for record in caplog.records), timeout=5, message="the relay summary in the log")

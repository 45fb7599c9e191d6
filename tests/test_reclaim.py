"""A lost `release` can be asked for again (issue 10: paid if and only if delivered and read).

Before, a recipient whose connection dropped after its `claim` reached the node but before the
`release` came back had paid for a message it could never read: a second claim got
`unknown_message`. Now the recipient's repeated claim with the same code gets the same key
again, after a reconnect and after a node restart, and nothing is journaled or redeemed twice.
Real node, real sockets, real chain (eth-tester).
"""
from __future__ import annotations

import contextlib
import json
import queue
import socket
import time

import pytest

from conftest import logged_in_sockets, make_users, wait_until
from dm import crypto, datadir, wire
from dm.chain import ethereum
from dm.chain.faucet import faucet_signer
from dm.client.awaiting import AwaitingLog
from dm.client.core import ChatClient, Events
from dm.relay.journal import Claim, Journal
from dm.relay.ledger import DeliveryLedger
from helpers import FrameProxy, login, start_node
from test_abuse import read_frame
from test_relay_burst import open_announced_book, send_frame


def private_key(data_dir, name):
    return crypto.load_private_key(datadir.private_key_path(data_dir, name))


def account(data_dir, name: str) -> str:
    return ethereum.address_of(datadir.read_secret(datadir.eth_key_path(data_dir, name)))


def deliver(node, data_dir, alice, bob, texts: list[str]):
    """alice sends real envelopes to bob on a fresh book; bob reads the delivers and opens
    their code slots. Returns (book, delivers, slots), by message index (msg_id "m<i>")."""
    book = open_announced_book(node, data_dir, alice, "alice", len(texts))
    bob_key = private_key(data_dir, "bob")
    envelopes = crypto.seal_many([({"text": text}, "bob", bob_key.public_key(), f"m{i}", book.codes[i])
                                  for i, text in enumerate(texts)], sender="alice",
                                 sender_key=private_key(data_dir, "alice"))
    for i, envelope in enumerate(envelopes):
        alice.sendall(wire.encode({"type": "send", "to": "bob", "msg_id": f"m{i}",
                                   "bounty": {"book": book.root.hex(), "index": i}, "envelope": envelope}))
    assert [read_frame(alice, timeout=15)["status"] for _ in texts] == ["delivered"] * len(texts)
    delivers = [read_frame(bob, timeout=15) for _ in texts]
    slots = [crypto.open_slot(d["envelope"], recipient="bob", recipient_key=bob_key,
                              sender_public_key=private_key(data_dir, "alice").public_key()) for d in delivers]
    return book, delivers, slots


def claim(sock, msg_id: str, code: bytes) -> dict:
    sock.sendall(wire.encode({"type": "claim", "msg_id": msg_id, "code": code.hex()}))
    return read_frame(sock, timeout=15)  # the machine the suite runs on may be busy


def opened_text(release: dict, deliver_frame: dict, slot) -> str:
    assert release["type"] == "release", release
    inner = crypto.open_node_layer(bytes.fromhex(release["key"]), deliver_frame["envelope"]["ciphertext"])
    return crypto.open_ciphertext(slot, inner)["text"]


def journaled(data_dir, msg_id: str, op: str = "claim") -> int:
    """How many `op` lines of the node's journal are for msg_id."""
    lines = (data_dir / "node" / "journal.jsonl").read_text().splitlines()
    return sum(1 for line in lines if json.loads(line).get("op") == op and json.loads(line).get("msg_id") == msg_id)


@contextlib.contextmanager
def logged_in(port: int, data_dir, name: str):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert login(sock, data_dir, name)["type"] == "welcome"
        yield sock
    finally:
        sock.close()


# --- (a) the connection drops between claim and release -----------------------------------------


def test_a_release_lost_with_the_connection_is_sent_again_for_the_same_code_and_paid_once(tester_node):
    node, data_dir = tester_node.node, tester_node.data_dir
    make_users(data_dir, "alice", "bob")
    with logged_in_sockets(node.port, data_dir, "alice") as socks:
        bob = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        assert login(bob, data_dir, "bob")["type"] == "welcome"
        book, delivers, slots = deliver(node, data_dir, socks["alice"], bob, ["read me once"])
        bob.sendall(wire.encode({"type": "claim", "msg_id": "m0", "code": slots[0].code.hex()}))
        wait_until(lambda: journaled(data_dir, "m0") == 1, timeout=10, message="the claim to be journaled")
        bob.close()  # gone before reading the release: the node was paid for a message bob cannot read

        with logged_in(node.port, data_dir, "bob") as bob:
            first = claim(bob, "m0", slots[0].code)
            assert opened_text(first, delivers[0], slots[0]) == "read me once"
            paid_by = ("book", book.root.hex(), 0, account(data_dir, "alice"))
            assert first["key"] == node.layer.key("alice", "m0", paid_by).hex()
            wait_until(lambda: node.token.is_leaf_spent(account(data_dir, "alice"), book.root, 0), timeout=20,
                       message="the redemption")
            assert claim(bob, "m0", slots[0].code) == first  # after the redemption too: the same key

    token, relayer = node.token, node.signer.address
    wait_until(lambda: node.redeemer.pending() == 0 and not node.redeemer.in_flight, timeout=20,
               message="the redemption to be final")  # mined is not yet final: the redeemer polls
    assert token.balance_of(relayer) == ethereum.TOKEN  # one redemption, one token
    assert journaled(data_dir, "m0") == 1  # the re-claims journaled nothing


# --- (b) the node restarts between claim and release ----------------------------------------------


@contextlib.contextmanager
def running_node(token, data_dir, faucet, signer=None):
    """An in-process node on data_dir (`signer`: the account of the node it restarts), stopped on the way out."""
    node = start_node(token, data_dir, faucet=faucet, signer=signer)
    try:
        yield node
    finally:
        node.stop()


def test_a_release_lost_to_a_node_restart_is_sent_again_and_paid_once(data_dir, tester_chain):
    w3, token = tester_chain
    faucet = faucet_signer(w3, data_dir)  # one Signer per key: one nonce sequence across the runs
    make_users(data_dir, "alice", "bob", "carol")
    with running_node(token, data_dir, faucet) as node:
        signer = node.signer
        with logged_in_sockets(node.port, data_dir, "alice", "bob") as socks:
            book, delivers, slots = deliver(node, data_dir, socks["alice"], socks["bob"], ["before", "across"])
            socks["bob"].sendall(b"".join(wire.encode({"type": "claim", "msg_id": f"m{i}", "code": s.code.hex()})
                                          for i, s in enumerate(slots)))
            wait_until(lambda: journaled(data_dir, "m1") == 1, timeout=10, message="the claims to be journaled")
    # The releases never reached bob; the stop redeemed what was queued.
    alice_account = account(data_dir, "alice")
    assert [token.is_leaf_spent(alice_account, book.root, i) for i in (0, 1)] == [True, True]
    earned = token.balance_of(signer.address)
    assert earned == 2 * ethereum.TOKEN

    for run in range(2):  # a second restart: the journal was compacted by the first
        with running_node(token, data_dir, faucet, signer) as node:
            with logged_in(node.port, data_dir, "bob") as bob:
                for i, text in enumerate(["before", "across"]):
                    assert opened_text(claim(bob, f"m{i}", slots[i].code), delivers[i], slots[i]) == text, run
                refused = claim(bob, "m0", slots[1].code)  # m1's code is not m0's
                assert (refused["type"], refused["code"], refused["ref"]) == ("error", "bad_code", "m0")
            with logged_in(node.port, data_dir, "carol") as carol:
                refused = claim(carol, "m0", slots[0].code)  # the right code, the wrong claimer
                assert (refused["type"], refused["code"]) == ("error", "unknown_message")
                assert "key" not in refused
            assert not node.redeemer.journal.pending  # the first run's claims were final: none to redeem
            assert node.redeemer.pending() == 0 and not node.redeemer.in_flight  # and the re-claims queued none
    assert token.balance_of(signer.address) == earned  # nothing redeemed again
    assert journaled(data_dir, "m0") == journaled(data_dir, "m1") == 0  # no claim line since the first run


# --- (c) only the recipient, only with the code ---------------------------------------------------


def test_a_re_claim_by_another_user_or_with_a_wrong_code_is_refused_and_leaves_the_recipient_s_own(tester_node):
    node, data_dir = tester_node.node, tester_node.data_dir
    with logged_in_sockets(node.port, data_dir, "alice", "bob", "carol") as socks:
        book, delivers, slots = deliver(node, data_dir, socks["alice"], socks["bob"], ["for bob only", "other"])
        assert opened_text(claim(socks["bob"], "m0", slots[0].code), delivers[0], slots[0]) == "for bob only"

        for sock, code, refusal in ((socks["carol"], slots[0].code, "unknown_message"),  # right code, not bob
                                    (socks["alice"], slots[0].code, "unknown_message"),  # nor its sender
                                    (socks["bob"], slots[1].code, "bad_code"),  # another message's code
                                    (socks["bob"], bytes(32), "bad_code")):
            answer = claim(sock, "m0", code)
            assert (answer["type"], answer["code"], answer.get("ref")) == ("error", refusal, "m0"), answer
            assert "key" not in answer
        assert opened_text(claim(socks["bob"], "m0", slots[0].code), delivers[0], slots[0]) == "for bob only"
        # m1 was never claimed: its first claim is a claim like any other, journaled once
        assert opened_text(claim(socks["bob"], "m1", slots[1].code), delivers[1], slots[1]) == "other"
    assert journaled(data_dir, "m0") == journaled(data_dir, "m1") == 1


def test_another_user_reusing_a_claimed_msg_id_leaves_the_recipient_s_re_claim(tester_node):
    """carol sends and claims a message of her own under the msg_id bob already claimed from
    alice. Before, the node kept one claim per msg_id, so carol's replaced bob's: his re-claim
    (for a release he lost) got unknown_message, and a message paid for could no longer be read."""
    node, data_dir = tester_node.node, tester_node.data_dir
    with logged_in_sockets(node.port, data_dir, "alice", "bob", "carol") as socks:
        book, delivers, slots = deliver(node, data_dir, socks["alice"], socks["bob"], ["for bob"])
        assert opened_text(claim(socks["bob"], "m0", slots[0].code), delivers[0], slots[0]) == "for bob"

        carol, own = socks["carol"], open_announced_book(node, data_dir, socks["carol"], "carol", 2)
        carol.sendall(send_frame("carol", "m0", own.root.hex(), 0))  # to herself: the same msg_id, another recipient
        assert {read_frame(carol)["type"], read_frame(carol)["type"]} == {"receipt", "deliver"}
        assert claim(carol, "m0", own.codes[0])["type"] == "release"
        # the same msg_id to bob while his claim of it is remembered would hide that claim: refused
        carol.sendall(send_frame("bob", "m0", own.root.hex(), 1))
        refusal = read_frame(carol)
        assert (refusal["type"], refusal["code"], refusal["ref"]) == ("error", "bad_field", "m0"), refusal

        assert opened_text(claim(socks["bob"], "m0", slots[0].code), delivers[0], slots[0]) == "for bob"


# --- the re-claim window: the claim timeout, after the claim ---------------------------------------


def test_a_claim_is_remembered_for_the_claim_timeout_after_it_then_freed(tmp_path):
    """The memory a re-claim needs is bounded like a pending delivery's: freed by the watchdog
    once the claim timeout has passed since the claim; the journal keeps it as long, no longer."""
    ledger = DeliveryLedger(claim_timeout=60)
    delivery = ("m0", "alice", "bob", ("book", "ab" * 32, 0), 100.0)
    ledger.reserve(delivery)
    ledger.delivered([delivery])
    assert ledger.settle(delivery)
    ledger.remember_claim(delivery, b"h" * 32, 130.0)
    assert ledger.claimed_by("m0", "carol") is None
    ledger.forget_settled(now=189.0)
    assert ledger.claimed_by("m0", "bob") == (delivery, b"h" * 32, 130.0)
    ledger.forget_settled(now=191.0)
    assert ledger.claimed_by("m0", "bob") is None and not ledger.claimed and not ledger.pending

    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    for msg_id, age in (("old", 61), ("new", 59)):
        old = Claim(msg_id, "alice", bytes([len(msg_id)]) * 32, recipient="bob", at=time.time() - age)
        journal.add(old)
        journal.done([old.key])
    journal.close()
    again = Journal(path, keep_claimed_for=60)
    assert [c.msg_id for c in again.claimed] == ["new"] and not again.pending
    again.close()
    assert [c.msg_id for c in Journal(path, keep_claimed_for=60).claimed] == ["new"]  # kept by the compaction


# --- (d) the client: the connection drops between claim and release --------------------------------


class CuttingProxy(FrameProxy):
    """On the first `release` it sees, drops it and cuts the connection; every later connection
    passes everything. So the node has the code and the client never got the key, as when a
    connection drops between claim and release. `hold`: how long a reconnect waits."""

    def __init__(self, node_port: int, hold: float = 0.0):
        self.cut: list[str] = []  # the msg_id of the release dropped
        super().__init__(node_port, hold)

    def from_node(self, message: dict) -> str:
        if message["type"] == "release" and not self.cut:
            self.cut.append(message["msg_id"])
            return "cut"
        return "pass"


def test_a_client_whose_connection_drops_between_claim_and_release_shows_the_message_after_reconnecting(
        tester_node):
    data_dir = tester_node.data_dir
    make_users(data_dir, "alice", "bob")
    proxy = CuttingProxy(tester_node.port)
    shown: queue.Queue = queue.Queue()
    states: list[str] = []
    bob = ChatClient("127.0.0.1", proxy.port, "bob", data_dir, rpc_url=ethereum.TESTER_URL,
                     w3=tester_node.node.token.w3, reconnect_max_delay=0.5,
                     events=Events(message=shown.put, connection=lambda state, detail: states.append(state)))
    try:
        bob.connect()
        alice = tester_node.client("alice", book_size=2)
        msg_id = alice.send_text("bob", "shown after the reconnect")
        message = shown.get(timeout=20)
        assert (message.sender, message.text, message.genuine) == ("alice", "shown after the reconnect", True)
        assert proxy.cut == [msg_id] and proxy.connections == 2 and "reconnected" in states
        with pytest.raises(queue.Empty):
            shown.get(timeout=1)  # shown once
        node = tester_node.node
        wait_until(lambda: node.token.balance_of(node.signer.address) == ethereum.TOKEN, timeout=20,
                   message="the redemption")
        assert journaled(data_dir, msg_id) == 1  # the client's re-claim was not journaled again
    finally:
        bob.close()
        proxy.close()


def test_a_re_claim_after_the_claim_timeout_is_refused_and_the_user_is_told_what_to_do(extra_nodes, data_dir):
    """The re-claim window is the claim timeout after the claim (here 0.5 s): a client that
    comes back later gets no key, and says so instead of waiting for one."""
    node = extra_nodes("short", claim_timeout=0.5)
    make_users(data_dir, "alice", "bob")
    proxy = CuttingProxy(node.port, hold=2.0)  # well past the 0.5 s window and a sweep
    shown: queue.Queue = queue.Queue()
    notices: queue.Queue = queue.Queue()
    clients = []
    try:
        for name, port, events in (("bob", proxy.port, Events(message=shown.put, notice=notices.put)),
                                   ("alice", node.port, None)):
            clients.append(ChatClient("127.0.0.1", port, name, data_dir, rpc_url=ethereum.TESTER_URL,
                                      w3=node.token.w3, book_size=2, reconnect_max_delay=0.5, events=events))
            clients[-1].connect()
        msg_id = clients[1].send_text("bob", "too late")
        notice = notices.get(timeout=20)
        assert notice.startswith(f"alice's message {msg_id} cannot be read: the node refused its code")
        assert "--claim-timeout" in notice and notice.endswith("Ask alice to send it again.")
        assert proxy.cut == [msg_id] and shown.empty()
    finally:
        for client in clients:
            client.close()
        proxy.close()


class ReleaseDroppingProxy(FrameProxy):
    """Passes everything but `release`: the node has the code, and the client never gets the key."""

    def __init__(self, node_port: int):
        self.dropped: list[str] = []
        super().__init__(node_port)

    def from_node(self, message: dict) -> str:
        if message["type"] == "release":
            self.dropped.append(message["msg_id"])
            return "drop"
        return "pass"


def test_a_client_restarted_before_its_key_came_claims_again_and_shows_the_message(tester_node):
    """The claims waiting for their key were kept in the client's memory only: a client that quit
    (or crashed) after its code reached the node and before the key came had paid for a message
    it could never read. They are kept on disk now (clients/NAME/awaiting.jsonl, mode 0600), and
    the restarted client claims them again; the node answers with the same key, paid once."""
    data_dir = tester_node.data_dir
    make_users(data_dir, "alice", "bob")
    proxy = ReleaseDroppingProxy(tester_node.port)
    node = tester_node.node

    def bob_client(port: int, shown: queue.Queue) -> ChatClient:
        client = ChatClient("127.0.0.1", port, "bob", data_dir, rpc_url=ethereum.TESTER_URL,
                            w3=node.token.w3, events=Events(message=shown.put))
        client.connect()
        return client

    first_run: queue.Queue = queue.Queue()
    bob = bob_client(proxy.port, first_run)
    try:
        alice = tester_node.client("alice", book_size=2)
        msg_id = alice.send_text("bob", "read after a restart")
        wait_until(lambda: proxy.dropped == [msg_id], timeout=20, message="the claim and its dropped release")
        assert journaled(data_dir, msg_id) == 1  # the node has the code: it will be paid
        with pytest.raises(queue.Empty):
            first_run.get(timeout=0.5)
    finally:
        bob.close()
        proxy.close()
    stored = data_dir / "clients" / "bob" / "awaiting.jsonl"
    assert stored.stat().st_mode & 0o777 == 0o600

    second_run: queue.Queue = queue.Queue()
    bob = bob_client(tester_node.port, second_run)  # a new process would do the same: nothing in memory
    try:
        message = second_run.get(timeout=20)
        assert (message.sender, message.text, message.genuine) == ("alice", "read after a restart", True)
        wait_until(lambda: node.token.balance_of(node.signer.address) == ethereum.TOKEN, timeout=20,
                   message="the redemption")
        assert journaled(data_dir, msg_id) == 1  # the re-claim was answered, not journaled again
    finally:
        bob.close()
    third_run: queue.Queue = queue.Queue()
    bob = bob_client(tester_node.port, third_run)  # shown once: nothing waits any more
    try:
        with pytest.raises(queue.Empty):
            third_run.get(timeout=1)
    finally:
        bob.close()


def test_the_claims_file_keeps_only_what_waits_and_a_torn_or_damaged_line_costs_only_itself(tmp_path):
    path = tmp_path / "clients" / "bob" / "awaiting.jsonl"
    log = AwaitingLog(path)
    assert log.load() == []
    for msg_id in ("a", "b", "c"):
        log.add({"type": "deliver", "msg_id": msg_id, "from": "alice"})
    log.done("a")
    with open(path, "a") as handle:  # a crash: no close(), a line cut short, and one not a deliver
        handle.write('{"deliver": 7}\n{"deliver": {"msg_id": "d", "fr')
    again = AwaitingLog(path)
    assert [d["msg_id"] for d in again.load()] == ["b", "c"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().splitlines()) == 2  # compacted on load
    again.done("b")
    again.close()
    assert [json.loads(line)["deliver"]["msg_id"] for line in path.read_text().splitlines()] == ["c"]

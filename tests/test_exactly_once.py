"""Exactly-once payment across crashes, restarts and rollbacks, and registrations nobody can
squat (issue 10, defects 3, 4 and 5).

The first two tests run node.py as a real process on a real anvil, talk to it over raw
sockets (alice sends on chosen leaves, bob returns chosen codes) and read the chain itself.
"""
from __future__ import annotations

import collections
import json
import signal
import time
from collections import Counter

import pytest

from conftest import cli_env, collecting_events, free_port, logged_in_sockets, make_users, wait_until
from dm import datadir, wire
from dm.chain import ethereum
from dm.chain.books import BookSecrets
from dm.client.core import ChatClient, Events
from helpers import FrameProxy
from test_abuse import read_frame
from test_relay_burst import send_frame

pytestmark = pytest.mark.e2e


# --- helpers ---------------------------------------------------------------------------------


def start_node(processes, env, port, *extra):
    node = processes(["node.py", "--host", "127.0.0.1", "--port", str(port), *extra], env)
    node.wait_for_line(lambda l: l.startswith("node ready"), timeout=60)
    return node


def address_of(data_dir, name: str) -> str:
    """A user's account, or the node's (name "node")."""
    path = data_dir / "node" / "node_ETH.key" if name == "node" else datadir.eth_key_path(data_dir, name)
    return ethereum.address_of(datadir.read_secret(path))


class Peer:
    """One logged-in raw socket; frames the test did not ask for (`paid`, `deliver`) are kept."""

    def __init__(self, sock):
        self.sock = sock
        self.paid: list[str] = []
        self.delivered: list[dict] = []

    def next(self, timeout: float = 10) -> dict:
        """The next frame that answers a request (not a `paid` notice, not a `deliver`)."""
        while True:
            frame = read_frame(self.sock, timeout=timeout)
            assert frame is not None, "the node hung up"
            if frame["type"] == "paid":
                self.paid += frame["msg_ids"]
            elif frame["type"] == "deliver":
                self.delivered.append(frame)
            else:
                return frame

    def send(self, to: str, msg_id: str, root: str, index: int) -> dict:
        self.sock.sendall(send_frame(to, msg_id, root, index))
        return self.next()

    def claim(self, msg_id: str, code: bytes) -> None:
        """Return a code; the node answers a good one with the key to its layer (`release`)."""
        self.sock.sendall(wire.encode({"type": "claim", "msg_id": msg_id, "code": code.hex()}))
        answer = self.next()
        assert answer["type"] == "release" and answer["msg_id"] == msg_id, f"the claim of {msg_id} was refused"

    def drain(self, seconds: float = 0.3) -> None:
        try:
            while True:
                self.next(timeout=seconds)
        except TimeoutError:
            pass


def open_book(token, data_dir, node_address, name: str, size: int) -> BookSecrets:
    """`name` (funded by the node's faucet at first login) opens a book bound to the node."""
    signer = ethereum.Signer(token.w3, datadir.read_secret(datadir.eth_key_path(data_dir, name)))
    wait_until(lambda: token.balance_of(signer.address) >= size * ethereum.TOKEN
               and token.w3.eth.get_balance(signer.address) > 0, message=f"{name} to be funded")
    book = BookSecrets.generate(size)
    now = token.w3.eth.get_block("latest")["timestamp"]
    token.open_book(signer, book.root, size, node_address, now + 86_400)
    return book


def announce(peer: Peer, book: BookSecrets) -> None:
    peer.sock.sendall(wire.encode({"type": "book", "root": book.root.hex(),
                                   "leaves": [leaf.hex() for leaf in book.leaf_hashes]}))
    assert peer.next() == {"type": "book", "root": book.root.hex(), "size": book.size}


def rpc(w3, method: str, params: list):
    response = w3.provider.make_request(method, params)
    assert "error" not in response, response
    return response["result"]


# --- defect 4: a restart forgets which leaves were used -------------------------------------------


def test_sigkill_and_restart_twice_no_leaf_serves_two_messages_and_every_claim_is_paid_once(
        anvil_chain, processes):
    """Before: across two restarts leaves 0-9 carried 30 deliveries and the node was paid 10, and
    codes returned after a restart for deliveries made before it got `unknown_message`.
    Now the node is SIGKILLed twice; after each restart every used leaf is refused, every
    pre-restart delivery's code is accepted, and the chain pays each claimed leaf exactly once.
    (Each kill comes 0.1 s after the last delivery: the delivery log is written within 5 ms.)"""
    data_dir, url, token = anvil_chain["data_dir"], anvil_chain["url"], anvil_chain["token"]
    env = cli_env(url, data_dir)
    make_users(data_dir, "alice", "bob")
    port = free_port()
    # Run 1 holds its claims back (a long batch wait), so the kill leaves codes in the journal.
    node = start_node(processes, env, port, "--batch-wait", "30", "--confirmations", "1")
    node_address = address_of(data_dir, "node")
    alice_address = address_of(data_dir, "alice")
    before = token.balance_of(node_address)
    carried = Counter()  # leaf -> deliveries bob received on it, over all three runs
    by_leaf: dict[int, str] = {}  # leaf -> the msg_id that leaf carried

    def receive(bob: Peer, count: int) -> None:
        wait_until(lambda: bob.drain(0.05) or len(bob.delivered) >= count, timeout=10,
                   message=f"{count} deliveries")
        for frame in bob.delivered:
            carried[frame["bounty"]["index"]] += 1
            by_leaf[frame["bounty"]["index"]] = frame["msg_id"]
        bob.delivered.clear()

    def refused_everywhere(alice: Peer, leaves, root: str, run: int) -> None:
        for leaf in leaves:
            answer = alice.send("bob", f"again-{run}-{leaf}", root, leaf)
            assert (answer["type"], answer["code"]) == ("error", "unpaid"), (leaf, answer)
            assert "already paid for another message" in answer["message"]

    with logged_in_sockets(port, data_dir, "alice", "bob") as socks:
        alice, bob = Peer(socks["alice"]), Peer(socks["bob"])
        book = open_book(token, data_dir, node_address, "alice", 8)
        root = book.root.hex()
        announce(alice, book)
        for leaf in range(4):
            assert alice.send("bob", f"m{leaf}", root, leaf)["status"] == "delivered"
        receive(bob, 4)
        for leaf in (0, 1):
            bob.claim(by_leaf[leaf], book.codes[leaf])
        time.sleep(0.1)
        node.stop(signal.SIGKILL)
    assert token.balance_of(node_address) == before  # nothing was redeemed: the codes sit in the journal

    node = start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "1")
    with logged_in_sockets(port, data_dir, "alice", "bob") as socks:
        alice, bob = Peer(socks["alice"]), Peer(socks["bob"])
        refused_everywhere(alice, range(4), root, 2)
        bob.claim(by_leaf[2], book.codes[2])  # a delivery made before the restart
        for leaf in (4, 5):
            assert alice.send("bob", f"m{leaf}", root, leaf)["status"] == "delivered"
        receive(bob, 2)
        bob.claim(by_leaf[4], book.codes[4])
        time.sleep(0.1)
        node.stop(signal.SIGKILL)

    node = start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "1")
    with logged_in_sockets(port, data_dir, "alice", "bob") as socks:
        alice, bob = Peer(socks["alice"]), Peer(socks["bob"])
        refused_everywhere(alice, range(6), root, 3)
        bob.claim(by_leaf[3], book.codes[3])  # made two restarts ago
        bob.claim(by_leaf[5], book.codes[5])
        wait_until(lambda: token.balance_of(node_address) - before == 6 * ethereum.TOKEN, timeout=30,
                   message="the six claimed leaves to be redeemed")
    node.stop()  # a clean stop redeems nothing twice
    assert carried == {leaf: 1 for leaf in range(6)}  # no leaf carried two messages
    assert token.balance_of(node_address) - before == 6 * ethereum.TOKEN
    assert [token.is_leaf_spent(alice_address, book.root, i) for i in range(8)] == [True] * 6 + [False] * 2


# --- defect 3: a rollback loses money the node already announced --------------------------------


def test_a_rollback_after_a_mined_redemption_is_redeemed_again_paid_after_confirmation_and_the_nonce_recovers(
        anvil_chain, processes):
    """Before: a redemption mined in one block was final at once (the sender was told `paid`),
    a chain that dropped that block left its codes unredeemed forever, and the node's nonce,
    now ahead of the chain, stalled every later redemption until a restart. Now, with
    --confirmations 3: the redemption is mined, nobody is told `paid`; anvil reverts to a
    snapshot taken before it; the node redeems the codes again, tells `paid` only once they
    are 3 blocks deep, and a later message is redeemed too, by the same node process."""
    data_dir, url, token = anvil_chain["data_dir"], anvil_chain["url"], anvil_chain["token"]
    w3 = token.w3
    env = cli_env(url, data_dir)
    make_users(data_dir, "alice", "bob")
    port = free_port()
    node = start_node(processes, env, port, "--batch-wait", "0.1", "--confirmations", "3")
    node_address = address_of(data_dir, "node")
    alice_address = address_of(data_dir, "alice")
    before = token.balance_of(node_address)
    with logged_in_sockets(port, data_dir, "alice", "bob") as socks:
        alice, bob = Peer(socks["alice"]), Peer(socks["bob"])
        book = open_book(token, data_dir, node_address, "alice", 4)
        root = book.root.hex()
        announce(alice, book)
        for leaf in (0, 1):
            assert alice.send("bob", f"r{leaf}", root, leaf)["status"] == "delivered"
        wait_until(lambda: bob.drain(0.05) or len(bob.delivered) == 2, message="two deliveries")
        snapshot = rpc(w3, "evm_snapshot", [])
        for frame in bob.delivered:
            bob.claim(frame["msg_id"], book.codes[frame["bounty"]["index"]])
        wait_until(lambda: token.is_leaf_spent(alice_address, book.root, 1), timeout=20, interval=0.02,
                   message="the redemption to be mined")
        mined_at = w3.eth.block_number
        assert rpc(w3, "evm_revert", [snapshot]) is True
        assert alice.paid == [] and w3.eth.block_number < mined_at  # not final, so nobody was told
        assert not token.is_leaf_spent(alice_address, book.root, 1)  # the redemption is gone

        wait_until(lambda: alice.drain(0.1) or sorted(alice.paid) == ["r0", "r1"], timeout=40,
                   message="the codes to be redeemed again and confirmed")
        spent_in = w3.eth.block_number
        assert token.balance_of(node_address) - before == 2 * ethereum.TOKEN
        # The nonce recovered without a restart: one more message is paid by the same process.
        assert alice.send("bob", "r2", root, 2)["status"] == "delivered"
        wait_until(lambda: bob.drain(0.05) or bob.delivered[-1]["msg_id"] == "r2", message="the third delivery")
        bob.claim("r2", book.codes[2])
        wait_until(lambda: token.is_leaf_spent(alice_address, book.root, 2), timeout=40,
                   message="the third redemption to be mined")
        alice.drain(0.1)
        assert sorted(alice.paid) == ["r0", "r1"]  # each told once, and r2 not before it is final
        assert spent_in >= mined_at - 1
    assert node.proc.poll() is None
    node.stop()
    assert token.balance_of(node_address) - before == 3 * ethereum.TOKEN
    assert [token.is_leaf_spent(alice_address, book.root, i) for i in range(4)] == [True, True, True, False]


# --- defect 5: front-running griefs a sender ---------------------------------------------------


def test_a_squatted_root_neither_blocks_the_victim_nor_is_used_by_her_restarted_client(tester_node):
    """Mallory copies Alice's root into her own openBook and has it mined first. Before, Alice's
    openBook reverted BookExists and her restarted client went on spending the squatted book.
    Now Alice's own openBook goes through; her restarted client resumes only a book the chain
    holds as hers; and the node is paid from Alice's book, never from Mallory's copy."""
    from dm.chain.faucet import faucet_signer, fund_user
    from dm.client import payment

    make_users(tester_node.data_dir, "alice", "bob", "mallory")
    token, node = tester_node.node.token, tester_node.node
    w3 = token.w3
    alice_key = datadir.read_secret(datadir.eth_key_path(tester_node.data_dir, "alice"))
    mallory = ethereum.Signer(w3, datadir.read_secret(datadir.eth_key_path(tester_node.data_dir, "mallory")))
    alice = ethereum.Signer(w3, alice_key)
    faucet = faucet_signer(w3, tester_node.data_dir)
    for signer in (alice, mallory):
        fund_user(token, faucet, signer.address)
    books_dir = tester_node.data_dir / "clients" / "alice" / "books"
    books_dir.mkdir(parents=True, exist_ok=True)
    expiry = w3.eth.get_block("latest")["timestamp"] + 86_400

    def saved_book(size: int) -> BookSecrets:
        """A book alice's client saved (it saves before it opens), as BookPayer writes it."""
        book = BookSecrets.generate(size)
        writer = payment.BookPayer.__new__(payment.BookPayer)
        writer.books_dir, writer.relayer = books_dir, node.signer.address
        writer._save(book, 0, expiry)
        return book

    # 1. A root only Mallory opened: alice's openBook never went through (say it was squatted).
    squatted = saved_book(4)
    token.open_book(mallory, squatted.root, 4, node.signer.address, expiry)
    # 2. A root Mallory copied first, and alice then opened too: no BookExists any more.
    copied = saved_book(4)
    token.open_book(mallory, copied.root, 4, node.signer.address, expiry)
    assert token.open_book(alice, copied.root, 4, node.signer.address, expiry)["status"] == 1
    json_path = books_dir / f"{copied.root.hex()}.json"
    json_path.touch()  # the newest file: the one a restarted client resumes first

    inbox, _, paid, events = collecting_events()
    tester_node.client("bob", events)
    client = tester_node.client("alice", collecting_events()[3], book_size=4)
    assert client.payer._book.root == copied.root  # her own book, held on chain as hers
    msg_id = client.send_text("bob", "on my own book")
    assert inbox.get(timeout=10).text == "on my own book"
    wait_until(lambda: token.book(alice.address, copied.root).spent == 1, message="alice's leaf to be redeemed")
    assert token.book(mallory.address, copied.root).spent == 0  # Mallory's copy paid nobody
    client.close()

    # Her book file for the squatted root is never resumed, whatever Mallory holds on chain.
    for path in books_dir.glob("*.json"):
        if path.name != f"{squatted.root.hex()}.json":
            record = json.loads(path.read_text())
            record["cursor"] = record["size"]  # used up: only the squatted one is left to resume
            path.write_text(json.dumps(record))
    (books_dir / f"{squatted.root.hex()}.json").touch()
    again = tester_node.client("alice", collecting_events()[3], book_size=4)
    assert again.payer._book is None  # nothing to resume: the next message opens a fresh book
    again.send_text("bob", "after a restart")
    assert inbox.get(timeout=10).text == "after a restart"
    assert again.payer._book.root not in (squatted.root, copied.root)
    assert msg_id


def test_a_book_whose_opening_a_rollback_dropped_carries_no_more_messages(tester_node):
    """A chain that drops the block that opened a book (a reorg; a dev chain restarted from an
    older state) left the book open in the node's index: messages on it were relayed and their
    keys released, and their codes could never be redeemed. The index now notices that the last
    block it read is gone, and learns the chain's bounties again: the book is refused `unpaid`."""
    from test_relay_burst import open_announced_book

    node = tester_node.node
    tester = node.token.w3.provider.ethereum_tester
    with logged_in_sockets(tester_node.port, tester_node.data_dir, "alice", "bob") as socks:
        before_the_book = tester.take_snapshot()
        book = open_announced_book(node, tester_node.data_dir, socks["alice"], "alice", 4)
        root = book.root.hex()
        node.index.sync()
        socks["alice"].sendall(send_frame("bob", "m0", root, 0))
        assert read_frame(socks["alice"]) == {"type": "receipt", "msg_id": "m0", "status": "delivered"}
        assert read_frame(socks["bob"])["msg_id"] == "m0"

        height = node.token.w3.eth.block_number
        tester.revert_to_snapshot(before_the_book)  # the block with openBook is gone
        tester.mine_blocks(height - node.token.w3.eth.block_number + 2)  # and the chain grew past it
        node.index.sync()
        assert node.index.rewinds == 1
        socks["alice"].sendall(send_frame("bob", "m1", root, 1))
        refusal = read_frame(socks["alice"])
        assert (refusal["type"], refusal["code"], refusal["ref"]) == ("error", "unpaid", "m1")
        # m0's code opens a book the chain no longer holds: it cannot be paid, so it gets no key
        socks["bob"].sendall(wire.encode({"type": "claim", "msg_id": "m0", "code": book.codes[0].hex()}))
        answer = read_frame(socks["bob"])
        assert (answer["type"], answer["code"]) == ("error", "bad_code"), answer


def test_a_client_whose_book_a_rollback_dropped_opens_a_new_one(tester_node):
    """After a rollback dropped the block that opened its book, the client went on paying from it:
    every line was refused `unpaid` until the client was restarted. Now the first refusal makes it
    ask the chain; a book the chain no longer holds as its own is dropped (and the account's nonce
    re-read), the user is told to send that line again, and the next line opens a new book."""
    from dm.chain.faucet import faucet_signer, fund_user

    node = tester_node.node
    w3 = node.token.w3
    tester = w3.provider.ethereum_tester
    make_users(tester_node.data_dir, "alice", "bob")
    inbox, receipts, _, events = collecting_events()
    notices: list[str] = []
    events.notice = notices.append
    tester_node.client("bob", collecting_events()[3])
    node.redeemer.batch_wait = 5.0  # the first code waits in the queue until after the rollback
    journal = tester_node.data_dir / "node" / "journal.jsonl"
    before_the_book = tester.take_snapshot()
    alice = tester_node.client("alice", events, book_size=4)
    first = alice.send_text("bob", "on the first book")
    wait_until(lambda: receipts.get(first) == "delivered", message="the first line")
    wait_until(lambda: journal.exists() and f'"{first}"' in journal.read_text(), message="bob's claim")
    dropped_root = alice.payer._book.root

    height = w3.eth.block_number
    tester.revert_to_snapshot(before_the_book)  # alice's openBook is gone, with her tokens
    tester.mine_blocks(height - w3.eth.block_number + 2)
    node.index.sync()
    fund_user(node.token, faucet_signer(w3, tester_node.data_dir), alice.eth_address)

    assert node.index.rewinds == 1  # alice's book was looked up, not read from events: still noticed
    refused = alice.send_text("bob", "refused: its book is gone")
    wait_until(lambda: receipts.get(refused) == "refused", message="the refusal")
    wait_until(lambda: any("send that line again" in n for n in notices), message="the notice")
    again = alice.send_text("bob", "on a new book")
    wait_until(lambda: receipts.get(again) == "delivered", message="the line on a new book")
    assert alice.payer._book.root != dropped_root
    # The first line's code, claimed before the rollback, can never be redeemed: the redeemer
    # drops it from the journal instead of trying it again every batch for ever.
    dropped_key = f"{alice.eth_address}:{dropped_root.hex()}:0"
    wait_until(lambda: any(json.loads(line)["op"] == "done" and dropped_key in json.loads(line)["keys"]
                           for line in journal.read_text().splitlines()),
               message="the dropped book's code to leave the journal")


def test_after_unpaid_refusals_the_client_asks_the_chain_about_its_book_at_most_every_5_s(tester_node, monkeypatch):
    """A burst of lines refused `unpaid` (for any reason) costs the client one chain call per
    GONE_CHECK_SECONDS, not one per line."""
    from dm.client import payment

    make_users(tester_node.data_dir, "alice")
    payer = tester_node.client("alice", collecting_events()[3], book_size=4).payer
    payer.next_bounty()  # opens a real book
    calls: list = []
    real_book = payer.token.book
    monkeypatch.setattr(payer.token, "book", lambda *args: calls.append(args) or real_book(*args))
    assert [payer.drop_if_gone() for _ in range(20)] == [False] * 20  # the chain holds it
    assert len(calls) == 1
    payer._checked_at -= payment.GONE_CHECK_SECONDS  # as if that long had passed
    assert payer.drop_if_gone() is False and len(calls) == 2


def test_codes_of_books_that_expired_while_waiting_are_dropped_and_hold_up_no_other_code(tester_node):
    """A node down past its books' expiry comes back with their codes in the journal, and the
    watchdog forgets expired books, leaves and all. Those codes can never be redeemed; they must
    leave the journal, and must not delay the codes of live books (a pause per stuck book and
    round kept a fresh code waiting past its own book's expiry)."""
    from dm.chain.faucet import faucet_signer, fund_user
    from dm.relay.journal import Claim

    node, data_dir = tester_node.node, tester_node.data_dir
    w3, token = node.token.w3, node.token
    make_users(data_dir, "alice")
    alice = ethereum.Signer(w3, datadir.read_secret(datadir.eth_key_path(data_dir, "alice")))
    fund_user(token, faucet_signer(w3, data_dir), alice.address)
    now = w3.eth.get_block("latest")["timestamp"]
    stuck = [BookSecrets.generate(1) for _ in range(4)]
    for book in stuck:  # opened on chain, never announced to this node: it cannot prove their codes
        token.open_book(alice, book.root, 1, node.signer.address, now + 60)
    w3.provider.ethereum_tester.time_travel(now + 120)  # ... and they expire
    w3.provider.ethereum_tester.mine_blocks(1)
    live = BookSecrets.generate(1)
    token.open_book(alice, live.root, 1, node.signer.address, now + 86_400)
    node.index.sync()
    assert node.index.announce_book(alice.address, live.root, live.leaf_hashes) is not None

    for number, book in enumerate(stuck):
        node.redeemer.submit(Claim(f"s{number}", "alice", book.codes[0], book.root, 0, alice.address))
    node.redeemer.submit(Claim("fresh", "alice", live.codes[0], live.root, 0, alice.address))
    started = time.monotonic()
    wait_until(lambda: token.is_leaf_spent(alice.address, live.root, 0), timeout=30, message="the fresh code paid")
    assert time.monotonic() - started < 3.5, "the fresh code waited behind the stuck ones"
    wait_until(lambda: not any(key.split(":")[1] in {b.root.hex() for b in stuck} for key in node.redeemer.journal.pending),
               timeout=10, message="the expired books' codes to leave the journal")


class Recorder:
    """Events of one ChatClient: genuine texts read, receipts by status (with detail), notices."""

    def __init__(self):
        self.read = collections.Counter()
        self.receipts: dict[str, tuple[str, str]] = {}
        self.paid: list[str] = []
        self.notices: list[str] = []

    def events(self) -> Events:
        return Events(message=lambda m: m.genuine and self.read.update([m.text]),
                      receipt=lambda msg_id, status, detail: self.receipts.__setitem__(msg_id, (status, detail)),
                      paid=self.paid.extend, notice=self.notices.append)


def test_books_opened_while_the_node_was_away_are_announced_so_their_messages_are_not_refused_unpaid(
        anvil_chain, processes):
    """A line typed while the node is away is paid for and queued; with a book of 2 codes,
    five such lines use the last leaf of book 1 and open books 2 and 3, which no node has heard
    of. On reconnect the client announces every book that pays for a queued message (it used to
    announce only the current one, and the node refused the lines on book 2 unpaid)."""
    data_dir, url = anvil_chain["data_dir"], anvil_chain["url"]
    env = cli_env(url, data_dir)
    make_users(data_dir, "alice", "bob")
    port = free_port()
    node = start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "1")
    alice_log, bob_log = Recorder(), Recorder()
    bob = ChatClient("127.0.0.1", port, "bob", data_dir, rpc_url=url, events=bob_log.events(),
                     reconnect_max_delay=0.3)
    alice = ChatClient("127.0.0.1", port, "alice", data_dir, rpc_url=url, book_size=2,
                       events=alice_log.events(), reconnect_max_delay=0.3)
    try:
        bob.connect()
        alice.connect()
        alice.send_text("bob", "before")  # opens book 1 while connected: announced
        wait_until(lambda: bob_log.read["before"] == 1, message="the first message")

        node.stop(signal.SIGKILL)
        wait_until(lambda: alice.connection_state == "reconnecting", message="alice to notice the outage")
        texts = [f"away-{i}" for i in range(5)]  # leaf 1 of book 1, then books 2 and 3 (opened meanwhile)
        for text in texts:
            alice.send_text("bob", text)
        node = start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "1")
        wait_until(lambda: len(alice_log.receipts) >= 6, timeout=60, message="every line answered")
        refused = {m: r for m, r in alice_log.receipts.items() if r[0] != "delivered"}
        assert refused == {}, f"{len(refused)} of 5 paid lines refused after the outage: {sorted(set(refused.values()))}"
        wait_until(lambda: all(bob_log.read[t] == 1 for t in texts), timeout=30, message="all five read")
    finally:
        alice.close()
        bob.close()


def test_a_resend_of_a_message_delivered_and_claimed_before_a_node_restart_is_answered_delivered_not_refused(
        anvil_chain, processes):
    """A resend of a message delivered, claimed and paid before a node restart (its receipt
    lost on the way) is answered `delivered` again, as without the restart; the node used to
    keep the bounty without its msg_id and refuse the resend unpaid, though bob had read it."""
    data_dir, url, token = anvil_chain["data_dir"], anvil_chain["url"], anvil_chain["token"]
    env = cli_env(url, data_dir)
    make_users(data_dir, "alice", "bob")
    port = free_port()
    node = start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "1")

    class NoReceipts(FrameProxy):
        def from_node(self, message: dict) -> str:
            return "drop" if message["type"] == "receipt" else "pass"

    proxy = NoReceipts(port)
    alice_log, bob_log = Recorder(), Recorder()
    bob = ChatClient("127.0.0.1", port, "bob", data_dir, rpc_url=url, events=bob_log.events(),
                     reconnect_max_delay=0.3)
    alice = ChatClient("127.0.0.1", proxy.port, "alice", data_dir, rpc_url=url, events=alice_log.events(),
                       reconnect_for=0)
    try:
        bob.connect()
        alice.connect()
        msg_id = alice.send_text("bob", "hello once")
        wait_until(lambda: bob_log.read["hello once"] == 1, message="bob to read it")
        node_address = alice.welcome["node_eth_address"]
        wait_until(lambda: token.balance_of(node_address) == 10**18, message="the node to be paid")
        assert alice_log.receipts == {}  # the receipt never reached alice
        alice.close()  # the message stays in alice's outbox, unanswered
        proxy.close()

        node.stop()  # a clean restart (SIGKILL gives the same)
        node = start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "1")
        alice = ChatClient("127.0.0.1", port, "alice", data_dir, rpc_url=url, events=alice_log.events(),
                           reconnect_max_delay=0.3)
        alice.connect()  # resends the outbox
        wait_until(lambda: msg_id in alice_log.receipts, timeout=30, message="the resend to be answered")
        time.sleep(1)
        assert bob_log.read["hello once"] == 1  # delivered once
        assert token.balance_of(node_address) == 10**18  # paid once
        assert alice_log.receipts[msg_id] == ("delivered", ""), alice_log.receipts[msg_id]
    finally:
        alice.close()
        bob.close()
        proxy.close()


def test_main_py_refund_run_while_the_client_pays_single_bounties_forgets_none_of_them(anvil_chain, processes):
    """`main.py refund NAME` rewrites clients/NAME/bounties.jsonl without the bounties it
    found closed; a client of NAME paying single bounties meanwhile appends to that file. The
    lines appended during the refund must survive its rewrite, or those bounties are never
    refunded. (client.py itself refuses to run beside `main.py refund`; a ChatClient does not.)"""
    import subprocess
    import sys

    from conftest import ROOT

    data_dir, url, token = anvil_chain["data_dir"], anvil_chain["url"], anvil_chain["token"]
    env = cli_env(url, data_dir)
    make_users(data_dir, "alice", "bob")
    port = free_port()
    start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "1", "--max-unclaimed", "5000")
    with logged_in_sockets(port, data_dir, "bob"):  # bob is pinned, online, and never claims
        alice = ChatClient("127.0.0.1", port, "alice", data_dir, rpc_url=url, pay="single")
        try:
            alice.connect()
            alice_address = address_of(data_dir, "alice")
            wait_until(lambda: token.balance_of(alice_address) > 0, message="alice to be funded")
            before = 30
            for i in range(before):  # open, unearned: the refund looks each one up
                alice.send_text("bob", f"before {i}")
            refund = subprocess.Popen([sys.executable, "main.py", "refund", "alice"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            during = 0
            while refund.poll() is None:  # alice goes on paying while the refund runs
                alice.send_text("bob", f"during {during}")
                during += 1
            output = refund.stdout.read()
            assert "refunded 0 BTK" in output, output
            recorded = {json.loads(line)["code_hash"]
                        for line in (data_dir / "clients" / "alice" / "bounties.jsonl").read_text().splitlines()}
            registered = token.contract.events.BountyRegistered().get_logs(
                from_block=0, argument_filters={"sender": alice_address})
            lost = [e for e in registered if bytes(e["args"]["codeHash"]).hex() not in recorded]
            assert len(registered) == before + during
            assert lost == [], (
                f"alice registered {during} bounties while the refund ran; {len(lost)} of them are no longer in "
                f"bounties.jsonl: {len(lost)} BTK that `main.py refund alice` will never give back")
        finally:
            alice.close()


def test_after_a_rollback_drops_a_senders_openbook_her_next_book_opens_instead_of_hanging(anvil_chain, processes):
    """A rollback drops alice's openBook after her message on it was read. Her book (of 1
    code) is used up, so no `unpaid` refusal makes her client re-read its nonce, and her next
    book's openBook went out with a local nonce the chain never reached: it waited behind the
    gap for 120 s and failed, and so did every later line. The signer now takes the chain's
    count when its own runs ahead."""
    data_dir, url, token = anvil_chain["data_dir"], anvil_chain["url"], anvil_chain["token"]
    w3 = token.w3
    env = cli_env(url, data_dir)
    make_users(data_dir, "alice", "bob")
    port = free_port()
    start_node(processes, env, port, "--batch-wait", "0.2", "--confirmations", "2")
    bob_log = Recorder()
    bob = ChatClient("127.0.0.1", port, "bob", data_dir, rpc_url=url, events=bob_log.events())
    alice = ChatClient("127.0.0.1", port, "alice", data_dir, rpc_url=url, book_size=1)
    try:
        bob.connect()
        alice.connect()
        wait_until(lambda: token.balance_of(alice.eth_address) > 0, message="alice to be funded")
        snapshot = rpc(w3, "evm_snapshot", [])
        alice.send_text("bob", "a")  # opens book A
        wait_until(lambda: bob_log.read["a"] == 1, message="bob to read a")
        assert rpc(w3, "evm_revert", [snapshot]) is True  # book A's openBook is gone
        rpc(w3, "evm_mine", [])
        started = time.monotonic()
        try:
            alice.send_text("bob", "b")  # needs a new book
            problem = None
        except Exception as exc:  # noqa: BLE001 - what the user would see
            problem = str(exc)
        took = time.monotonic() - started
        assert problem is None and took < 20, f"the next line took {took:.0f}s and failed: {problem}"
        wait_until(lambda: bob_log.read["b"] == 1, message="bob to read b")
    finally:
        alice.close()
        bob.close()

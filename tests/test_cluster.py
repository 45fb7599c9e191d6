"""Several nodes as one network (node.py --cluster): three real nats-servers in a cluster,
three node.py processes on one anvil chain, clients spread over them. The set-up is paid
once for the module; the tests run in file order and the last ones stop a node and a NATS
server, so each test names what it relies on."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import nats
import pytest

from conftest import collecting_events, make_users, wait_until
from dm import PROJECT_ROOT, crypto, datadir, wire
from dm.chain import devchain, ethereum
from dm.chain.books import keccak
from dm.client.core import ChatClient
from dm.client.errors import ClientError
from dm.client.receiving import Receiver
from dm.cluster.local import NodeProcess, prepare_node_dir
from dm.cluster.natsd import LocalNatsCluster
from dm.net import free_port
from helpers import login, user_keys

BOOK = 4  # codes per book: small books keep the chain work short
# --cluster-claims-max 1: the stream holds one code for a node that is down; the next ones wait
# at the node they were returned at (test_codes_claimed_while_the_senders_node_is_killed_...).
CLAIMS_MAX_AGE = 600
UNCLAIMED = 6  # --max-unclaimed: test_max_unclaimed_holds_for_messages_between_nodes
NODE_FLAGS = ("--batch-size", "20", "--batch-wait", "0.2", "--cluster-timeout", "2", "--log-level", "info",
              "--cluster-claims-max", "1", "--cluster-claims-max-age", str(CLAIMS_MAX_AGE),
              "--max-unclaimed", str(UNCLAIMED))
# Node 3 holds every forwarded code back this long before storing it in JetStream, so a test can
# SIGKILL it after the recipient got the key and before JetStream has the code.
HOLD = {"DM_TEST_HOLD_FORWARD": "60"}


class Network:
    def __init__(self, base, url, w3, token, users, nats, nodes):
        self.base, self.url, self.w3, self.token, self.users, self.nats, self.nodes = \
            base, url, w3, token, users, nats, nodes
        self.clients: list[ChatClient] = []

    def client(self, node: int, name: str, **options):
        inbox, receipts, paid, events = collecting_events()
        client = ChatClient("127.0.0.1", self.nodes[node].port, name, self.users, rpc_url=self.url, events=events,
                            book_size=BOOK, **options)
        client.connect()
        self.clients.append(client)
        return client, inbox, receipts, paid

    def earned(self, node: int) -> int:
        return self.token.balance_of(self.nodes[node].address) // ethereum.TOKEN


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    users = base / "users"  # the chain's record, its faucet and every user's keys
    users.mkdir(mode=0o700)
    url = f"http://127.0.0.1:{free_port()}"
    w3, anvil = devchain.ensure_chain(url, users)
    nats_cluster = nodes = None
    try:
        token, _ = devchain.ensure_deployment(w3, url, users)
        nats_cluster = LocalNatsCluster(base / "nats", 3).start()
        nodes = []
        for i in range(4):
            prepare_node_dir(token, users, base / f"node{i}")
            # node 3 lets one cross-node message wait for an answer at a time (test_a_stalled_node_...),
            # and takes two members a channel (test_every_node_mirrors_the_members_...)
            extra = ("--cluster-max-in-flight", "1", "--max-members", "2") if i == 3 else ()
            nodes.append(NodeProcess(base / f"node{i}", url, nats_cluster.urls, free_port(), *NODE_FLAGS, *extra,
                                     env=HOLD if i == 3 else None).start())
        make_users(users, "alice", "bob", "carol", "dave", "frank", "erin", "gina")
        for node in nodes:
            node.wait_ready()
        net = Network(base, url, w3, token, users, nats_cluster, nodes)
        yield net
        for client in net.clients:
            client.close()
    finally:
        for node in nodes or []:
            node.signal_stop()  # all at once: each redeems what it has queued
        for node in nodes or []:
            node.stop()
        if nats_cluster is not None:
            nats_cluster.stop()
        anvil.stop()


@pytest.fixture(scope="module")
def chat(network):
    """alice on node 0, bob on node 1, carol on node 2, all online."""
    alice = network.client(0, "alice")
    bob = network.client(1, "bob")
    carol = network.client(2, "carol")
    wait_until(lambda: set(alice[0].peers()) >= {"alice", "bob", "carol"}, 10, message="presence across nodes")
    return {"alice": alice, "bob": bob, "carol": carol}


def test_a_direct_message_crosses_nodes_and_its_code_pays_the_senders_node_once(network, chat):
    alice, _, alice_receipts, alice_paid = chat["alice"]
    _, bob_inbox, _, _ = chat["bob"]
    before = [network.earned(i) for i in range(3)]
    msg_ids = alice.send_many("bob", ["over the network", "second"])
    got = [bob_inbox.get(timeout=10) for _ in msg_ids]
    assert [(m.sender, m.text, m.genuine) for m in got] == [("alice", "over the network", True), ("alice", "second", True)]
    wait_until(lambda: all(alice_receipts.get(m) == "delivered" for m in msg_ids), 10, message="receipts")
    # bob returned both codes at node 1; node 0 (alice's book's relayer) redeems them, and says so
    wait_until(lambda: set(msg_ids) <= set(alice_paid), 20, message="paid notices from alice's node")
    assert [network.earned(i) - before[i] for i in range(3)] == [2, 0, 0]


def test_a_channel_message_reaches_members_on_every_node(network, chat):
    (alice, _, receipts, _), (bob, bob_inbox, _, _), (carol, carol_inbox, _, _) = \
        chat["alice"], chat["bob"], chat["carol"]
    for client in (alice, bob, carol):
        client.join("#net")
    # membership is network-wide: alice's node sees the members who joined elsewhere
    wait_until(lambda: set(alice._connection.request({"type": "members", "channel": "#net"})["online"])
               == {"alice", "bob", "carol"}, 10, message="members across nodes")
    sent, offline = alice.send_to_channel("#net", "hello everyone")
    assert len(sent) == 2 and offline == []
    for inbox in (bob_inbox, carol_inbox):
        message = inbox.get(timeout=10)
        assert (message.sender, message.text, message.channel, message.genuine) == ("alice", "hello everyone", "#net", True)
    wait_until(lambda: all(receipts.get(m) == "delivered" for m in sent), 10, message="channel receipts")
    # paid before the test ends: the tests after it count node 0's earnings
    wait_until(lambda: set(sent) <= set(chat["alice"][3]), 20, message="paid notices for the channel copies")
    carol.leave("#net")  # a leave reaches every node too
    wait_until(lambda: set(alice._connection.request({"type": "members", "channel": "#net"})["online"])
               == {"alice", "bob"}, 10, message="a leave across nodes")


def test_presence_covers_the_network_and_offline_is_reported(network, chat):
    bob = chat["bob"][0]
    assert {"alice", "bob", "carol"} <= set(bob.peers())
    alice, _, receipts, _ = chat["alice"]
    notices = []
    alice.events.notice = notices.append
    # dave is pinned (he logs in once) but connected nowhere: NATS "no responders" -> offline
    network.client(2, "dave")[0].close()
    wait_until(lambda: "dave" not in bob.peers(), 10, message="dave to drop out of peers")
    entries = alice._sender.prepare([("dave", alice.peer_key("dave"), "are you there?")])
    msg_ids, frames = [entry.msg_id for entry in entries], b"".join(entry.frame for entry in entries)
    alice._write_raw(frames)
    wait_until(lambda: receipts.get(msg_ids[0]) == "offline", 10, message="an offline receipt")
    # offline released the bounty and the msg_id: the very same send may go again later
    # (a client's outbox resends it unchanged), and is not refused as a spent bounty
    alice._write_raw(frames)
    alice._write_raw(wire.encode({"type": "ping", "req": 7}))
    time.sleep(0.5)
    assert notices == []


def test_a_name_pinned_on_one_node_cannot_be_taken_on_another(network, chat, tmp_path):
    make_users(network.users, "ellie")
    network.client(0, "ellie")[0].close()  # pinned on node 0
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    make_users(other, "ellie", "eIIie", "zed")  # another key for "ellie", a look-alike name, and a rival "zed"
    for name, code in (("ellie", "name_taken"), ("eIIie", "name_confusable")):
        with socket.create_connection(("127.0.0.1", network.nodes[1].port), timeout=10) as sock:
            answer = login(sock, other, name)
        assert (answer["type"], answer["code"]) == ("error", code), answer
    # Two keys claim the new name "zed" on two nodes at the same moment: the network's
    # create-only pin lets exactly one of them have it.
    make_users(network.users, "zed")
    answers = {}

    def claim(node, keys_dir):
        with socket.create_connection(("127.0.0.1", network.nodes[node].port), timeout=10) as sock:
            answers[node] = login(sock, keys_dir, "zed")

    threads = [threading.Thread(target=claim, args=(1, network.users)), threading.Thread(target=claim, args=(2, other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    kinds = sorted(a.get("code", a["type"]) for a in answers.values())
    assert kinds == ["name_taken", "welcome"], answers


def _as_a_node(network, coroutine):
    """Run `coroutine(nc)` with a NATS connection of the network's, as another node would."""
    async def run():
        nc = await nats.connect(network.nats.urls.split(","))
        try:
            return await coroutine(nc)
        finally:
            await nc.close()
    return asyncio.run(run())


def test_a_code_returned_at_another_node_too_late_to_be_redeemed_opens_nothing(network, chat):
    """A message relayed to another node carries, besides its layer key, the time after which
    its code can no longer be redeemed by the sender's node (its bounty's expiry less that
    node's claim margin). Before, the recipient's node released the key for a valid code at
    any time: a pair with a book about to expire read across nodes what nobody paid for."""
    from dm.cluster.routing import user_subject
    from dm.relay.bounties import REDEEM_MARGIN

    make_users(network.users, "hank")
    # 1. The sender's node says when: a message to hank while he is offline reaches whoever
    #    answers for him on the network (here, this test).
    with socket.create_connection(("127.0.0.1", network.nodes[1].port), timeout=10) as sock:
        assert login(sock, network.users, "hank")["type"] == "welcome"  # pinned, then offline
    alice = chat["alice"][0]
    asked: list = []

    async def answer_for_hank(nc):
        async def answer(msg):
            asked.append(msg.headers)
            await msg.respond(b"offline")
        subscription = await nc.subscribe(user_subject("hank"), cb=answer)
        await nc.flush()
        await asyncio.get_running_loop().run_in_executor(None, _send_raw, alice, "hank", "are you there?")
        for _ in range(100):
            if asked:
                break
            await asyncio.sleep(0.05)
        await subscription.unsubscribe()

    _as_a_node(network, answer_for_hank)
    assert len(asked) == 1
    pay = json.loads(asked[0]["Dm-Pay"])
    assert pay[0] == "book"
    expiry = network.token.book(user_keys(network.users, "alice")[2], bytes.fromhex(pay[1])).expiry
    assert pay[5] == pytest.approx(expiry - REDEEM_MARGIN - 0.2)  # the nodes run --batch-wait 0.2

    # 2. The recipient's node keeps to it: past that time a valid code gets `expired` and no key.
    sock = socket.create_connection(("127.0.0.1", network.nodes[1].port), timeout=10)
    try:
        assert login(sock, network.users, "hank")["type"] == "welcome"
        decoder = wire.MessageDecoder()
        answers = {}
        for msg_id, claim_by in (("in-time", time.time() + 600), ("too-late", time.time() - 1)):
            code = secrets.token_bytes(32)
            pay = ["single", keccak(code).hex(), "", "", "ab" * 32, claim_by]
            headers = {"Dm-Msg": msg_id, "Dm-From": "alice", "Dm-Origin": "f" * 32, "Dm-Pay": json.dumps(pay),
                       "Dm-Deadline": f"{time.time() + 5:.3f}"}
            body = json.dumps({"type": "deliver", "from": "alice", "to": "hank", "msg_id": msg_id}).encode()

            async def deliver(nc):
                return (await nc.request(user_subject("hank"), body, timeout=5, headers=headers)).data
            assert _as_a_node(network, deliver) == b"delivered"
            delivered = list(decoder.feed_messages(sock.recv(65536)))
            assert [m["msg_id"] for m in delivered] == [msg_id]
            sock.sendall(wire.encode({"type": "claim", "msg_id": msg_id, "code": code.hex()}))
            answers[msg_id] = next(iter(decoder.feed_messages(sock.recv(65536))))
        assert answers["in-time"] == {"type": "release", "msg_id": "in-time", "key": "ab" * 32}
        too_late = answers["too-late"]
        assert (too_late["type"], too_late["code"], too_late["ref"]) == ("error", "expired", "too-late"), too_late
    finally:
        sock.close()


def _never_claims(network, node: int, name: str, stack) -> list[dict]:
    """A recipient on a raw socket that reads every deliver and returns no code; the delivers it got."""
    sock = socket.create_connection(("127.0.0.1", network.nodes[node].port), timeout=10)
    stack.callback(sock.close)
    assert login(sock, network.users, name)["type"] == "welcome"
    got: list[dict] = []

    def read() -> None:
        decoder = wire.MessageDecoder()
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            got.extend(m for m in decoder.feed_messages(data) if m["type"] == "deliver")
    threading.Thread(target=read, daemon=True).start()
    return got


def test_max_unclaimed_holds_for_messages_between_nodes(network, chat):
    """--max-unclaimed caps what a sender, and a recipient, may have waiting for codes. Between
    nodes it was not checked at all: 12 of 12 went to a recipient that never claims, under a cap
    of 3. Now the sender's node counts a routed message from the moment it goes, and the
    recipient's node refuses past the recipient's cap (the sender gets unclaimed_limit)."""
    make_users(network.users, "ivan", "judy", "kate", "leo")
    with contextlib.ExitStack() as stack:
        judy, kate = _never_claims(network, 1, "judy", stack), _never_claims(network, 1, "kate", stack)
        ivan, _, ivan_receipts, _ = network.client(0, "ivan")
        leo, _, leo_receipts, _ = network.client(2, "leo")
        wait_until(lambda: {"judy", "kate"} <= set(ivan.peers()) and "judy" in leo.peers(), 10, message="presence")

        def send(client, receipts, to: str, count: int, expected: int) -> None:
            msg_ids = [_send_raw(client, to, f"{to} {i}") for i in range(count)]
            wait_until(lambda: sum(receipts.get(m) == "delivered" for m in msg_ids) >= expected, 10,
                       message=f"{expected} delivered to {to}")
            time.sleep(0.5)
            assert sum(receipts.get(m) == "delivered" for m in msg_ids) == expected

        send(ivan, ivan_receipts, "judy", UNCLAIMED - 2, UNCLAIMED - 2)
        send(ivan, ivan_receipts, "kate", 4, 2)  # ivan's own cap, at his node
        send(leo, leo_receipts, "judy", 4, 2)  # judy's cap, at her node
        assert (len(judy), len(kate)) == (UNCLAIMED, 2)


def test_every_node_mirrors_the_members_the_network_accepted_whatever_its_own_cap(network, chat):
    """Node 3 takes two members a channel, the others a thousand. A channel of three that node 0
    accepted was two on node 3: it dropped the member past its own cap from its copy (and two
    nodes that each let in one more member at the same moment disagreed the same way), so a
    channel message from node 3 never reached that member. Every node now mirrors what the
    network accepted; the cap is checked where a user joins."""
    make_users(network.users, "mia", "ned", "olga", "pat")
    for name in ("mia", "ned", "olga"):
        network.client(0, name)[0].join("#big")
    pat = network.client(3, "pat")[0]
    wait_until(lambda: pat._connection.request({"type": "channels"})["all"].get("#big") == 3, 10,
               message="node 3 to count three members in #big")
    with pytest.raises(ClientError, match="limit_reached"):  # its own cap still holds for its users
        pat.join("#big")


def _raw_recipient(network, node: int, name: str):
    """A recipient on a raw socket that opens deliveries but returns codes only when told."""
    sock = socket.create_connection(("127.0.0.1", network.nodes[node].port), timeout=10)
    assert login(sock, network.users, name)["type"] == "welcome"
    rsa_key = crypto.load_private_key(datadir.private_key_path(network.users, name))
    keys = {}

    def peer_key(peer):
        if peer not in keys:
            keys[peer] = crypto.public_key_from_pem(datadir.public_key_path(network.users, peer).read_text())
        return keys[peer]

    return sock, Receiver(name, rsa_key, peer_key), wire.MessageDecoder()


def _read_claims(sock, receiver, decoder, count: int, delivers: list | None = None) -> list[dict]:
    claims = []
    deadline = time.monotonic() + 10
    while len(claims) < count and time.monotonic() < deadline:
        for message in decoder.feed_messages(sock.recv(65536)):
            if message["type"] == "deliver":
                incoming, claim = receiver.deliver(message)
                assert incoming is None and claim is not None, incoming  # genuine: its text waits for release
                claims.append(claim)
                if delivers is not None:
                    delivers.append(message)
    assert len(claims) == count
    return claims


def _read_releases(sock, receiver, decoder, count: int) -> list[str]:
    """The texts `count` release frames open; anything else but a `paid` notice (for messages
    this user sent earlier) fails the test."""
    texts, deadline = [], time.monotonic() + 10
    while len(texts) < count and time.monotonic() < deadline:
        for message in decoder.feed_messages(sock.recv(65536)):
            if message["type"] == "paid":
                continue
            assert message["type"] == "release", message
            incoming = receiver.release(message)
            assert incoming is not None and incoming.genuine, incoming
            texts.append(incoming.text)
    return sorted(texts)


def _node_id(node: NodeProcess) -> str:
    return (node.data_dir / "node" / "node_id").read_text().strip()


def _times_of(receipts: dict, msg_ids: list[str], timeout: float = 10) -> dict[str, float]:
    """msg_id -> the monotonic time its receipt was first seen."""
    seen, deadline = {}, time.monotonic() + timeout
    while len(seen) < len(msg_ids) and time.monotonic() < deadline:
        for msg_id in msg_ids:
            if msg_id not in seen and msg_id in receipts:
                seen[msg_id] = time.monotonic()
        time.sleep(0.01)
    assert len(seen) == len(msg_ids), receipts
    return seen


def _send_raw(client, to: str, text: str) -> str:
    """One message written as the client would, but not kept in its outbox (which would send
    it again when `to` comes back)."""
    entry = client._sender.prepare([(to, client.peer_key(to), text)])[0]
    client._write_raw(entry.frame)
    return entry.msg_id


def test_a_stalled_node_costs_the_sender_its_cluster_timeout_and_delivers_nothing_late(network, chat):
    """carol's node 2 is stopped (SIGSTOP): it keeps its NATS subscription but answers nothing.
    frank's node 3 runs with --cluster-timeout 2 and --cluster-max-in-flight 1. A message to
    carol is `offline` after the timeout; a message to bob sent meanwhile waits for the one slot,
    then is delivered. When node 2 runs again, the request it finds is past its deadline: carol
    does not get a message her sender was told is offline."""
    (bob_inbox, carol_inbox) = chat["bob"][1], chat["carol"][1]
    frank, _, receipts, _ = network.client(3, "frank")
    try:  # node 3's faucet funds a new user just after the welcome
        wait_until(lambda: network.token.balance_of(user_keys(network.users, "frank")[2]) > 0, 15,
                   message="frank's BTK from node 3's faucet")
        warm = [frank.send_text("carol", "warm up"), frank.send_text("bob", "warm up")]
        wait_until(lambda: all(receipts.get(m) == "delivered" for m in warm), 15, message="warm-up receipts")
        assert carol_inbox.get(timeout=10).text == bob_inbox.get(timeout=10).text == "warm up"
        stalled = network.nodes[2].proc
        stalled.send_signal(signal.SIGSTOP)
        try:
            sent = {"carol": (time.monotonic(), _send_raw(frank, "carol", "while you were stopped"))}
            time.sleep(0.8)  # the carol message holds node 3's only in-flight slot now
            sent["bob"] = (time.monotonic(), _send_raw(frank, "bob", "queued behind it"))
            seen = _times_of(receipts, [msg_id for _, msg_id in sent.values()])
        finally:
            stalled.send_signal(signal.SIGCONT)
        (carol_at, to_carol), (bob_at, to_bob) = sent["carol"], sent["bob"]
        assert receipts[to_carol] == "offline" and 1.8 <= seen[to_carol] - carol_at <= 5, seen[to_carol] - carol_at
        assert receipts[to_bob] == "delivered" and seen[to_bob] - bob_at >= 0.6, seen[to_bob] - bob_at
        assert bob_inbox.get(timeout=10).text == "queued behind it"
        wait_until(lambda: any("dropped a delivery to carol" in line for line in network.nodes[2].lines), 10,
                   message="node 2 to drop the late request")
        with pytest.raises(queue.Empty):
            carol_inbox.get(timeout=1)
    finally:
        frank.close()


def test_codes_released_at_the_recipients_node_survive_its_sigkill_before_jetstream_stored_them(network, chat):
    """frank (node 3) returns two codes for alice's messages (paid to node 0) and gets the keys.
    Node 3 holds forwarded codes back (HOLD), so it is SIGKILLed after the release went out and
    before JetStream had the codes. It restarts without the hold; node 0 is paid for both, once.
    A copy of a code stored again under another message id (a duplicate that JetStream's
    deduplication does not catch) pays nothing more."""
    alice, _, receipts, _ = chat["alice"]
    sock, receiver, decoder = _raw_recipient(network, 3, "frank")
    try:
        wait_until(lambda: "frank" in alice.peers(), 10, message="frank online")
        before = network.earned(0)
        msg_ids = alice.send_many("frank", ["one", "two"])
        delivers = []
        claims = _read_claims(sock, receiver, decoder, 2, delivers)
        wait_until(lambda: all(receipts.get(m) == "delivered" for m in msg_ids), 10, message="receipts")
        sock.sendall(b"".join(wire.encode(claim) for claim in claims))
        assert _read_releases(sock, receiver, decoder, 2) == ["one", "two"]  # frank has read both
        network.nodes[3].stop(kill=True)
        network.nodes[3].env = {}
        network.nodes[3].start().wait_ready()
        wait_until(lambda: network.earned(0) - before == 2, 30, message="node 0 to be paid for the codes node 3 took")
    finally:
        sock.close()
    # The same code again, as a node that forwards it twice would, outside JetStream's deduplication.
    async def publish_copy():
        nc = await nats.connect(network.nats.urls.split(","))
        try:
            deliver, claim = delivers[0], claims[0]
            paid_by = [*wire.bounty_key(deliver["bounty"]), ""][:3]
            copy = {"msg_id": deliver["msg_id"], "sender": "alice", "recipient": "frank", "code": claim["code"],
                    "paid_by": paid_by}
            await nc.jetstream().publish(f"dm.claims.{_node_id(network.nodes[0])}", json.dumps(copy).encode(),
                                         headers={"Nats-Msg-Id": "a copy"})
        finally:
            await nc.close()

    asyncio.run(publish_copy())
    time.sleep(2)
    assert network.earned(0) - before == 2


def _claims_waiting(network, node: NodeProcess):
    """(codes waiting in DM_CLAIMS for `node`, the stream's config)."""
    async def ask():
        nc = await nats.connect(network.nats.urls.split(","))
        try:
            subject = f"dm.claims.{_node_id(node)}"
            info = await nc.jetstream().stream_info("DM_CLAIMS", subjects_filter=subject)
            return (info.state.subjects or {}).get(subject, 0), info.config
        finally:
            await nc.close()
    return asyncio.run(ask())


def test_codes_claimed_while_the_senders_node_is_killed_are_paid_once_it_is_back(network, chat):
    """SIGKILL alice's node after it relayed two messages to dave on node 1. dave returns the
    codes at node 1 while node 0 is down. The stream holds at most --cluster-claims-max (1) for
    node 0: one code waits there, the other in node 1's journal. Node 0 redeems both, once, when
    it comes back. Meanwhile alice moves to node 2 and goes on talking."""
    alice, _, receipts, _ = chat["alice"]
    sock, receiver, decoder = _raw_recipient(network, 1, "dave")
    try:
        wait_until(lambda: "dave" in alice.peers(), 10, message="dave online")
        msg_ids = alice.send_many("dave", ["one", "two"])
        claims = _read_claims(sock, receiver, decoder, 2)
        wait_until(lambda: all(receipts.get(m) == "delivered" for m in msg_ids), 10, message="receipts")
        before = network.earned(0)
        network.nodes[0].stop(kill=True)
        mark = len(network.nodes[1].lines)
        sock.sendall(b"".join(wire.encode(claim) for claim in claims))
        # Key release across nodes: node 1 answers each code with node 0's layer key (it came with
        # the message), which opens the text, though node 0 is down; and no error: node 1 stored
        # both codes in the stream.
        texts, deadline = [], time.monotonic() + 10
        while len(texts) < 2 and time.monotonic() < deadline:
            for message in decoder.feed_messages(sock.recv(65536)):
                assert message["type"] == "release", message
                incoming = receiver.release(message)
                assert incoming is not None and incoming.genuine, incoming
                texts.append(incoming.text)
        assert sorted(texts) == ["one", "two"]
        sock.settimeout(1)
        with pytest.raises(socket.timeout):
            sock.recv(65536)
        assert network.earned(0) == before
        # the limit: one code in the stream for node 0, the other refused there and kept by node 1
        wait_until(lambda: any("JetStream did not store 1 code(s)" in line for line in network.nodes[1].lines[mark:]),
                   10, message="node 1 to keep the code the stream refused")
        waiting, config = _claims_waiting(network, network.nodes[0])
        assert (waiting, config.max_msgs_per_subject, config.max_age) == (1, 1, CLAIMS_MAX_AGE)
        # alice's users move on: she logs in on node 2 and reaches bob on node 1
        moved, _, moved_receipts, _ = network.client(2, "alice")
        again = moved.send_text("bob", "still here, via node 2")
        wait_until(lambda: moved_receipts.get(again) == "delivered", 10, message="delivery after the move")
        network.nodes[0].start().wait_ready()
        wait_until(lambda: network.earned(0) - before == 2, 30, message="node 0 to redeem the waiting codes")
        # the same codes again (a retry at node 1) pay nothing more
        sock.sendall(b"".join(wire.encode(claim) for claim in claims))
        time.sleep(1.5)
        assert network.earned(0) - before == 2
    finally:
        sock.close()


def test_the_network_survives_one_nats_server_stopping(network, chat):
    """The NATS server bob's node is connected to stops: that node reconnects to another one,
    and JetStream (three replicas) keeps a quorum on the two left."""
    bob, bob_inbox, bob_receipts, bob_paid = chat["bob"]
    carol, carol_inbox, _, _ = chat["carol"]
    before = network.earned(1)
    bobs_node = "dm-node-" + (network.nodes[1].data_dir / "node" / "node_id").read_text().strip()[:8]
    server = next(s for s in network.nats.servers if bobs_node in s.client_names())
    server.stop()
    msg_id = wait_until(lambda: _delivered(bob, bob_receipts, "carol"), 20, message="a delivery after the stop")
    assert carol_inbox.get(timeout=10).text == "after the stop"
    assert any("lost the NATS server" in line for line in network.nodes[1].lines)
    # its watches of pins and channels were started afresh on the new server
    wait_until(lambda: any("watching pins and channels again" in line for line in network.nodes[1].lines), 20,
               message="node 1 to watch the shared records again")
    wait_until(lambda: msg_id in bob_paid, 20, message="carol's code to pay bob's node")
    assert network.earned(1) - before == 1
    # a new name is still pinned network-wide (JetStream KV with two of three servers), and
    # channel membership still reaches every node
    erin = network.client(2, "erin")[0]
    assert erin.welcome["name"] == "erin"
    erin.join("#after")
    bob.join("#after")
    wait_until(lambda: set(bob._connection.request({"type": "members", "channel": "#after"})["online"])
               == {"bob", "erin"}, 10, message="membership after the stop")


def _delivered(client, receipts, to):
    """Send one message; its id once it was delivered, None if it was not (yet)."""
    msg_id = client.send_text(to, "after the stop")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and msg_id not in receipts:
        time.sleep(0.05)
    return msg_id if receipts.get(msg_id) == "delivered" else None


def _join_when_ready(client, channel: str, timeout: float) -> None:
    """`client` joins `channel`, trying again while JetStream is not ready yet (unavailable) or
    the client is reconnecting (it may have lost its node while NATS was away)."""
    errors: list[str] = []

    def joined() -> bool:
        try:
            client.join(channel)
        except ClientError as exc:
            assert str(exc).endswith("(unavailable)") or str(exc).startswith("not connected"), exc
            errors.append(str(exc))
            return False
        return True
    try:
        wait_until(joined, timeout, interval=0.5, message=f"a join of {channel}")
    except AssertionError:
        raise AssertionError(f"no join of {channel} within {timeout}s: {errors[-3:]}") from None


def test_when_nats_cannot_answer_users_are_told_what_to_do_and_each_node_serves_its_own(network, chat):
    """Every NATS server stops. What needs the network is refused within --cluster-timeout with
    `unavailable`, saying to try again (a login, a join, a lookup of a name this node has not
    cached), a message to another node is `offline`, and users of one node go on talking. When
    NATS is back, so is the network. No node logs a traceback."""
    bob, _, bob_receipts, _ = chat["bob"]
    carol, _, carol_receipts, _ = chat["carol"]
    # erin is on node 2 if the test before ran in this worker (xdist may split the module)
    erin = next((c for c in network.clients if c.me == "erin"), None) or network.client(2, "erin")[0]

    def log_in():
        with socket.create_connection(("127.0.0.1", network.nodes[1].port), timeout=10) as sock:
            return login(sock, network.users, "gina")

    def refusal(client, request):
        try:
            return client._connection.request(request)
        except ClientError as exc:
            return str(exc)

    def offline_across_nodes():
        to_bob = _send_raw(carol, "bob", "NATS is down")
        wait_until(lambda: to_bob in carol_receipts, 5, message="a receipt across nodes")
        return carol_receipts[to_bob]

    def local_delivery():  # carol and erin are both on node 2
        sent = carol.send_text("erin", "same node")
        wait_until(lambda: sent in carol_receipts, 5, message="a receipt within node 2")
        return carol_receipts[sent]

    for server in network.nats.servers:
        server.stop()
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(5) as pool:  # one connection each: they wait side by side
            answers = [pool.submit(check) for check in (
                log_in, lambda: refusal(erin, {"type": "join", "channel": "#down"}),
                lambda: refusal(bob, {"type": "lookup", "name": "nobody"}),
                offline_across_nodes, local_delivery)]
            login_answer, join, lookup, across, local = [answer.result() for answer in answers]
        assert time.monotonic() - started < 6
    finally:
        for server in network.nats.servers:
            server.start()
        for server in network.nats.servers:
            server.wait_ready()
    assert (login_answer["type"], login_answer["code"]) == ("error", "unavailable"), login_answer
    assert "try again in a moment" in login_answer["message"], login_answer
    assert re.fullmatch(r"the network of nodes did not answer within 2s: try again in a moment \(unavailable\)", join)
    assert re.fullmatch(r"the network of nodes did not answer within 2s whether 'nobody' exists: try again in a "
                        r"moment \(unavailable\)", lookup)
    assert (across, local) == ("offline", "delivered")
    again = wait_until(lambda: _delivered(bob, bob_receipts, "carol"), 30, message="a delivery with NATS back")
    assert again
    # The join refused `unavailable` left erin out of #down on her own node too (it used to stay
    # there alone: the network never had it, a retry said "joined" without asking the network, and
    # a leave was refused); joined again, she is in #down on every node, and leaves it.
    answer = refusal(erin, {"type": "members", "channel": "#down"})
    assert isinstance(answer, str) and answer.endswith("(not_a_member)"), answer
    _join_when_ready(erin, "#down", 60)  # JetStream elects its leaders again: seconds, more on a busy machine
    bob.join("#down")
    wait_until(lambda: "erin" in refusal(bob, {"type": "members", "channel": "#down"})["online"], 10,
               message="erin in #down as bob's node sees it")
    erin.leave("#down")
    for node in network.nodes:
        assert not any("Traceback" in line for line in node.lines), node.lines


def test_cluster_flags_refuse_values_that_cannot_work():
    """A cap or wait of 0 or less is refused at once, naming the flag; no traceback."""
    cases = (("--cluster-timeout", "0"), ("--cluster-max-in-flight", "-1"), ("--cluster-replicas", "0"),
             ("--cluster-claims-max", "0"), ("--cluster-claims-max-age", "-5"))
    runs = [subprocess.Popen([sys.executable, "node.py", "--cluster", "nats://127.0.0.1:4222", flag, value],
                             cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for flag, value in cases]
    for (flag, value), run in zip(cases, runs):
        _, stderr = run.communicate(timeout=30)
        assert run.returncode == 2 and "Traceback" not in stderr, stderr
        assert f"argument {flag}: must be above 0, not {value}" in stderr, stderr

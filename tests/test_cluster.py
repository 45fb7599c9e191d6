"""Several nodes as one network (node.py --cluster): three real nats-servers in a cluster,
three node.py processes on one anvil chain, clients spread over them. The set-up is paid
once for the module; the tests run in file order and the last ones stop a node and a NATS
server, so each test names what it relies on."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import nats
import pytest

from conftest import collecting_events, make_users, wait_until
from dm import crypto, datadir, wire
from dm.chain import devchain, ethereum
from dm.client.core import ChatClient
from dm.client.receiving import Receiver
from dm.cluster.local import NodeProcess, prepare_node_dir
from dm.cluster.natsd import LocalNatsCluster
from dm.net import free_port
from helpers import login

BOOK = 4  # codes per book: small books keep the chain work short
NODE_FLAGS = ("--batch-size", "20", "--batch-wait", "0.2", "--cluster-timeout", "2", "--log-level", "info")
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
    nats = nodes = None
    try:
        token, _ = devchain.ensure_deployment(w3, url, users)
        nats = LocalNatsCluster(base / "nats", 3).start()
        nodes = []
        for i in range(4):
            prepare_node_dir(token, users, base / f"node{i}")
            nodes.append(NodeProcess(base / f"node{i}", url, nats.urls, free_port(), *NODE_FLAGS,
                                     env=HOLD if i == 3 else None).start())
        make_users(users, "alice", "bob", "carol", "dave", "frank")
        for node in nodes:
            node.wait_ready()
        net = Network(base, url, w3, token, users, nats, nodes)
        yield net
        for client in net.clients:
            client.close()
    finally:
        for node in nodes or []:
            node.signal_stop()  # all at once: each redeems what it has queued
        for node in nodes or []:
            node.stop()
        if nats is not None:
            nats.stop()
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
    """The texts `count` release frames open; anything else fails the test."""
    texts, deadline = [], time.monotonic() + 10
    while len(texts) < count and time.monotonic() < deadline:
        for message in decoder.feed_messages(sock.recv(65536)):
            assert message["type"] == "release", message
            incoming = receiver.release(message)
            assert incoming is not None and incoming.genuine, incoming
            texts.append(incoming.text)
    return sorted(texts)


def _node_id(node: NodeProcess) -> str:
    return (node.data_dir / "node" / "node_id").read_text().strip()


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


def test_codes_claimed_while_the_senders_node_is_killed_are_paid_once_it_is_back(network, chat):
    """SIGKILL alice's node after it relayed two messages to dave on node 1. dave returns the
    codes at node 1 while node 0 is down: they wait in JetStream, and node 0 redeems them,
    once, when it comes back. Meanwhile alice moves to node 2 and goes on talking."""
    alice, _, receipts, _ = chat["alice"]
    sock, receiver, decoder = _raw_recipient(network, 1, "dave")
    try:
        wait_until(lambda: "dave" in alice.peers(), 10, message="dave online")
        msg_ids = alice.send_many("dave", ["one", "two"])
        claims = _read_claims(sock, receiver, decoder, 2)
        wait_until(lambda: all(receipts.get(m) == "delivered" for m in msg_ids), 10, message="receipts")
        before = network.earned(0)
        network.nodes[0].stop(kill=True)
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
    make_users(network.users, "erin")
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

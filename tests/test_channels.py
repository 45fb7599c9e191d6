"""More than two clients, and open channels: in-process on eth-tester, and as
twenty client processes on anvil."""
from __future__ import annotations

import json
import queue

import pytest

from conftest import cli_env, collecting_events, free_port, make_users, wait_until
from dm import crypto, datadir
from dm.chain import ethereum


def test_a_channel_message_reaches_every_online_member_each_paid_separately(tester_node):
    names = ["host", "m1", "m2", "m3", "away"]
    make_users(tester_node.data_dir, *names)
    token = tester_node.node.token
    inboxes, clients = {}, {}
    for name in names:
        inbox, _, _, events = collecting_events()
        inboxes[name] = inbox
        clients[name] = tester_node.client(name, events, book_size=8)
        assert "#general" in clients[name].join("#general")["joined"]
    clients["away"].close()
    wait_until(lambda: "away" not in clients["host"].peers(), message="away to go offline")
    node_before = token.balance_of(tester_node.address)

    sent, offline = clients["host"].send_to_channel("#general", "hello channel")
    assert offline == ["away"] and len(sent) == 3
    for name in ("m1", "m2", "m3"):
        message = inboxes[name].get(timeout=10)
        assert (message.channel, message.sender, message.text, message.genuine) == \
            ("#general", "host", "hello channel", True)
        assert message.line() == "[#general host] hello channel"
    wait_until(lambda: token.balance_of(tester_node.address) - node_before == 3 * ethereum.TOKEN,
               message="three copies redeemed")
    book = token.book(clients["host"].eth_address, clients["host"].payer._book.root)
    assert book.spent == 3  # away's copy was never paid: its leaf stays unspent and refundable
    with pytest.raises(queue.Empty):
        inboxes["host"].get(timeout=0.3)  # the sender gets no copy of its own message


def test_a_member_who_leaves_receives_nothing_more(tester_node):
    make_users(tester_node.data_dir, "a", "b", "c")
    inboxes, clients = {}, {}
    for name in ("a", "b", "c"):
        inbox, _, _, events = collecting_events()
        inboxes[name], clients[name] = inbox, tester_node.client(name, events, book_size=6)
        clients[name].join("#room")
    clients["a"].send_to_channel("#room", "before")
    assert inboxes["b"].get(timeout=10).text == "before" and inboxes["c"].get(timeout=10).text == "before"
    assert clients["c"].leave("#room")["joined"] == []
    sent, _ = clients["a"].send_to_channel("#room", "after")
    assert len(sent) == 1 and inboxes["b"].get(timeout=10).text == "after"
    with pytest.raises(queue.Empty):
        inboxes["c"].get(timeout=1)
    # Even a sender who still thinks c is a member cannot reach c through the channel.
    details = {}
    clients["a"].events.receipt = lambda msg_id, status, detail: details.__setitem__(msg_id, (status, detail))
    bounty = clients["a"].payer.next_bounty()
    envelope = crypto.seal({"text": "sneak", "channel": "#room"}, sender="a", code=bounty.code,
                              recipient="c", sender_key=clients["a"].rsa_key,
                              recipient_public_key=clients["a"].peer_key("c"))
    clients["a"].outstanding[envelope["msg_id"]] = object()
    clients["a"]._write({"type": "send", "to": "c", "channel": "#room", "msg_id": envelope["msg_id"],
                         "bounty": bounty.wire, "envelope": envelope})
    wait_until(lambda: envelope["msg_id"] in details, message="the refusal")
    assert details[envelope["msg_id"]][0] == "refused" and "not_a_member" in details[envelope["msg_id"]][1]
    with pytest.raises(queue.Empty):
        inboxes["c"].get(timeout=0.5)


def test_a_changed_key_for_a_known_peer_is_loudly_refused(tester_node):
    """bob pinned alice's key earlier; now someone holding another key is 'alice' on
    this node. Her message must not be shown as genuine, and bob is warned."""
    make_users(tester_node.data_dir, "alice", "bob")
    old_alice = crypto.generate_private_key(2048)
    pins = tester_node.data_dir / "clients" / "bob" / "peers.json"
    datadir.write_json(pins, {"alice": crypto.public_key_pem(old_alice)})
    bob_inbox, _, _, bob_events = collecting_events()
    tester_node.client("bob", bob_events)
    alice = tester_node.client("alice", book_size=3)
    alice.send_text("bob", "trust me")
    message = bob_inbox.get(timeout=10)
    assert not message.genuine and message.text == ""
    assert "CHANGED" in message.problem and crypto.fingerprint(old_alice) in message.problem
    assert json.loads(pins.read_text())["alice"] == crypto.public_key_pem(old_alice)  # never silently replaced


def test_fingerprints_match_the_key_files_main_py_made(tester_node):
    make_users(tester_node.data_dir, "alice", "bob")
    alice = tester_node.client("alice")
    tester_node.client("bob")
    expected = crypto.fingerprint(crypto.load_public_key(datadir.public_key_path(tester_node.data_dir, "bob")))
    assert alice.fingerprint("bob") == expected
    assert alice.fingerprint("alice") == crypto.fingerprint(alice.rsa_key.public_key())


# ---------------------------------------------------------------------------------
# As processes on anvil
# ---------------------------------------------------------------------------------

def _start_client(processes, env, port, me, peer, *extra):
    client = processes(["client.py", "127.0.0.1", str(port), me, peer, *extra], env)
    return client


@pytest.mark.e2e
def test_twenty_clients_and_a_channel_of_ten_on_anvil(anvil_chain, processes):
    """Twenty client processes; ten of them and a sender share #ten. One message
    reaches all ten, ten bounties are redeemed, and the sender pays exactly ten."""
    data_dir, url = anvil_chain["data_dir"], anvil_chain["url"]
    env = cli_env(url, data_dir)
    names = [f"user{i:02d}" for i in range(20)]
    make_users(data_dir, *names)
    port = free_port()
    node = processes(["node.py", "--host", "127.0.0.1", "--port", str(port), "--batch-wait", "0.3"], env)
    node.wait_for_line(lambda l: l.startswith("node ready"), timeout=60)
    sender, members, others = names[0], names[1:11], names[11:]
    clients = {}
    for name in names:  # everyone starts at once; each joins its channel first thing
        peer = "#ten" if name in (sender, *members) else "#else"
        clients[name] = _start_client(processes, env, port, name, peer, "--book-size", "10")
        clients[name].write(f"/join {peer}\n")
    for name in names:
        clients[name].wait_for_line(lambda l: l.startswith("(joined"), stream="errors", timeout=90)
    token = anvil_chain["token"]
    sender_address = ethereum.address_of((data_dir / "keys" / f"{sender}_ETH.key").read_text())
    node_address = ethereum.address_of((data_dir / "node" / "node_ETH.key").read_text())
    wait_until(lambda: token.balance_of(sender_address) > 0, message="the sender to be funded")
    sender_before, node_before = token.balance_of(sender_address), token.balance_of(node_address)

    clients[sender].write("hello, ten\n")
    for name in members:
        clients[name].wait_for_line(lambda l: l == f"[#ten {sender}] hello, ten", timeout=30)
    wait_until(lambda: token.balance_of(node_address) - node_before == 10 * ethereum.TOKEN, timeout=30,
               message="ten redemptions")
    assert sender_before - token.balance_of(sender_address) == 10 * ethereum.TOKEN  # one book of exactly ten
    for name in others:
        assert not clients[name].lines, f"{name} is not in #ten but received {clients[name].lines}"


@pytest.mark.e2e
def test_slash_to_switches_between_three_peers(anvil_chain, processes):
    data_dir, url = anvil_chain["data_dir"], anvil_chain["url"]
    env = cli_env(url, data_dir)
    make_users(data_dir, "me", "p1", "p2", "p3")
    port = free_port()
    node = processes(["node.py", "--host", "127.0.0.1", "--port", str(port)], env)
    node.wait_for_line(lambda l: l.startswith("node ready"), timeout=60)
    peers = {name: _start_client(processes, env, port, name, "me") for name in ("p1", "p2", "p3")}
    for proc in peers.values():
        proc.wait_for_line(lambda l: l.startswith("connected to"), stream="errors")
    me = _start_client(processes, env, port, "me", "p1", "--book-size", "5")
    me.write("to p1\n/to p2\nto p2\n/to p3\nto p3\n/peers\n")
    for name, proc in peers.items():
        proc.wait_for_line(lambda l: l == f"[me] to {name}", timeout=30)
    me.wait_for_line(lambda l: l.startswith("online:") and all(p in l for p in peers), stream="errors")
    me.close_stdin()
    assert me.proc.wait(60) == 0
    for name, proc in peers.items():
        assert proc.lines == [f"[me] to {name}"]

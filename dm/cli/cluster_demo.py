"""The cluster demo (`make cluster-demo`): a 3-server NATS cluster, three relay nodes on the
demo's local chain, alice, bob and carol each on a different node; a conversation and a
channel across nodes; then alice's node stops and the conversation goes on through another.

    python -m dm.cli.cluster_demo [--data-dir DIR] [--rpc-url URL]
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import sys
import time

from dm import datadir
from dm.chain import devchain, ethereum
from dm.cli.accounts import create_users
from dm.client.core import ChatClient, Events
from dm.cluster.local import NodeProcess, prepare_node_dir
from dm.cluster.natsd import LocalNatsCluster, NatsError
from dm.net import free_port

USERS = ("alice", "bob", "carol")


class _User:
    """A ChatClient whose messages and notices are printed as they arrive."""

    def __init__(self, name: str, node: int, port: int, data_dir, rpc_url: str):
        self.name, self.node = name, node
        self.inbox: queue.Queue = queue.Queue()
        self.paid: list[str] = []
        events = Events(message=self.inbox.put, paid=self.paid.extend,
                        notice=lambda text: print(f"   ({name}: {text})"))
        self.client = ChatClient("127.0.0.1", port, name, data_dir, rpc_url=rpc_url, events=events, book_size=10)
        self.client.connect()

    def expect(self, count: int = 1) -> None:
        for _ in range(count):
            message = self.inbox.get(timeout=30)
            print(f"  {self.name}'s screen (node {self.node}): {message.line()}")


def _say(user: _User, to: str, text: str) -> list[str]:
    print(f"  {user.name} (node {user.node}) -> {to}: {text}")
    if to.startswith("#"):
        return user.client.send_to_channel(to, text)[0]
    return [user.client.send_text(to, text)]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster demo timed out waiting for {what}")
        time.sleep(0.05)


def run(data_dir, rpc_url: str) -> int:
    for name in USERS:
        if not datadir.private_key_path(data_dir, name).exists():
            create_users(data_dir, [name])
    w3, anvil = devchain.ensure_chain(rpc_url, data_dir)
    base = data_dir / "cluster"
    nats = None
    nodes: list[NodeProcess] = []
    users: dict[str, _User] = {}
    earned_before: list[int] = []
    try:
        token, record = devchain.ensure_deployment(w3, rpc_url, data_dir)
        print(f"\nchain {record.chain_id} at {rpc_url}; BountyToken at {record.address}")
        shutil.rmtree(base / "nats", ignore_errors=True)  # a fresh NATS cluster each run
        nats = LocalNatsCluster(base / "nats", 3).start()
        print(f"NATS cluster of 3 servers (JetStream on each): {nats.urls}")
        for i in range(3):
            prepare_node_dir(token, data_dir, base / f"node{i + 1}")
            nodes.append(NodeProcess(base / f"node{i + 1}", rpc_url, nats.urls, free_port(),
                                     "--batch-wait", "0.5", "--log-level", "info").start())
        for i, node in enumerate(nodes):
            node.wait_ready()
            print(f"relay node {i + 1} on port {node.port}, paid to {node.address}")
        earned_before = [token.balance_of(node.address) for node in nodes]

        for i, name in enumerate(USERS):
            users[name] = _User(name, i + 1, nodes[i].port, data_dir, rpc_url)
        alice, bob, carol = users["alice"], users["bob"], users["carol"]
        _wait(lambda: set(alice.client.peers()) >= set(USERS), 15, "everyone to be online network-wide")
        print(f"\nalice's node sees everyone online: {alice.client.peers()}")

        print("\na conversation across nodes (each sender pays its own node, 1 BTK a delivered message):")
        first = _say(alice, "bob", "Hi Bob, I am on node 1 and you are on node 2.")
        bob.expect()
        _say(bob, "alice", "Hi Alice: NATS carried this between our nodes.")
        alice.expect()

        print("\na channel whose members are on three nodes:")
        for user in users.values():
            user.client.join("#ops")
        _wait(lambda: len(carol.client._connection.request({"type": "members", "channel": "#ops"})["online"]) == 3,
              15, "#ops membership to reach every node")
        _say(carol, "#ops", "Hello #ops from node 3.")
        alice.expect()
        bob.expect()

        # bob's code for alice's first message went to node 1 (alice paid node 1) through JetStream
        _wait(lambda: set(first) <= set(alice.paid), 120, "node 1 to redeem the code bob returned at node 2")
        print("\n  (alice's node 1 redeemed the code bob returned at node 2: alice sees it paid)")
        print("\nnode 1 (alice's) stops; alice logs in on node 3 and the conversation goes on:")
        nodes[0].stop()
        alice.client.close()
        users["alice"] = alice = _User("alice", 3, nodes[2].port, data_dir, rpc_url)
        _wait(lambda: "alice" in bob.client.peers(), 15, "alice to show up again")
        _say(alice, "bob", "Node 1 is gone; I am back through node 3.")
        bob.expect()
        _say(bob, "alice", "Still here. Nothing was lost.")
        alice.expect()
        _wait(lambda: sum(token.balance_of(n.address) for n in nodes) - sum(earned_before) >= 6 * ethereum.TOKEN, 120,
              "the nodes to redeem the codes")
        print("\nBTK earned by each node (node 1 redeemed what it was owed before it stopped):")
        for i, node in enumerate(nodes):
            earned = (token.balance_of(node.address) - earned_before[i]) / ethereum.TOKEN
            print(f"  node {i + 1}: {earned:+g} BTK")
        return 0
    except TimeoutError:
        for i, node in enumerate(nodes):  # what the nodes said, to see why
            for line in node.lines[-5:]:
                print(f"   (node {i + 1}: {line})", file=sys.stderr)
            if earned_before:
                print(f"   (node {i + 1} earned {(token.balance_of(node.address) - earned_before[i]) / ethereum.TOKEN:+g}"
                      " BTK)", file=sys.stderr)
        raise
    finally:
        for user in users.values():
            user.client.close()
        for node in nodes:
            node.signal_stop()
        for node in nodes:
            node.stop()
        if nats is not None:
            nats.stop()
        devchain.stop_on_exit(anvil)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Three relay nodes as one network over NATS, on the demo's chain.")
    parser.add_argument("--data-dir", help=f"data directory (default: ${datadir.ENV_VAR} or {datadir.DEFAULT})")
    parser.add_argument("--rpc-url", default=os.environ.get("DM_RPC_URL", ethereum.DEFAULT_RPC_URL))
    args = parser.parse_args(argv)
    try:
        return run(datadir.resolve(args.data_dir), args.rpc_url)
    except KeyboardInterrupt:
        print("\ncluster demo stopped; every process it started has been stopped", file=sys.stderr)
        return 130
    except (ethereum.ChainError, NatsError, TimeoutError, RuntimeError, datadir.DataError) as exc:
        print(f"cluster demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Presence over real sockets: a watcher, and a channel's members, hear when a user comes
online or goes offline and when someone joins or leaves; the per-user cap on watches holds."""
from __future__ import annotations

import contextlib
import socket

from conftest import logged_in_sockets, make_users, wait_until
from dm import wire
from helpers import login
from test_abuse import read_frame


def next_of(sock: socket.socket, kind: str, timeout: float = 5) -> dict:
    """The next frame of type `kind`, skipping others (a presence notice may come before a reply)."""
    while True:
        frame = read_frame(sock, timeout=timeout)
        assert frame is not None, f"the node hung up while we waited for a {kind!r}"
        if frame["type"] == kind:
            return frame


def request(sock: socket.socket, message: dict, req: int) -> dict:
    sock.sendall(wire.encode({**message, "req": req}))
    while True:
        frame = read_frame(sock)
        if frame.get("req") == req:
            return frame


@contextlib.contextmanager
def logged_in(port: int, data_dir, name: str):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert login(sock, data_dir, name)["type"] == "welcome"
        yield sock


def test_a_watcher_hears_a_peer_come_online_and_go_offline(tester_node):
    make_users(tester_node.data_dir, "bob")
    with logged_in_sockets(tester_node.port, tester_node.data_dir, "alice") as socks:
        alice = socks["alice"]
        reply = request(alice, {"type": "watch", "names": ["bob", "bob"]}, 1)
        assert reply == {"type": "watch", "online": [], "offline": ["bob"], "req": 1}
        with logged_in(tester_node.port, tester_node.data_dir, "bob"):
            assert next_of(alice, "presence") == {"type": "presence", "name": "bob", "online": True}
        assert next_of(alice, "presence") == {"type": "presence", "name": "bob", "online": False}
        assert request(alice, {"type": "watch", "names": ["no such/name"]}, 2)["code"] == "bad_field"
        # unwatched: bob's next visit is not told
        assert request(alice, {"type": "unwatch", "names": ["bob"]}, 3)["type"] == "unwatch"
        with logged_in(tester_node.port, tester_node.data_dir, "bob"):
            assert request(alice, {"type": "ping"}, 4) == {"type": "pong", "req": 4}  # nothing came before it


def test_channel_members_hear_joins_leaves_and_each_other_coming_and_going(tester_node):
    make_users(tester_node.data_dir, "carol")
    with logged_in_sockets(tester_node.port, tester_node.data_dir, "alice") as socks:
        alice = socks["alice"]
        assert request(alice, {"type": "join", "channel": "#dev"}, 1)["type"] == "channels"
        with logged_in(tester_node.port, tester_node.data_dir, "carol") as carol:
            assert request(carol, {"type": "join", "channel": "#dev"}, 1)["type"] == "channels"
            assert next_of(alice, "membership") == {"type": "membership", "channel": "#dev", "name": "carol",
                                                    "joined": True}
            assert request(carol, {"type": "join", "channel": "#dev"}, 2)["type"] == "channels"  # no news
        # carol is a member, not watched: alice hears she went, and hears she is back
        assert next_of(alice, "presence") == {"type": "presence", "name": "carol", "online": False}
        with logged_in(tester_node.port, tester_node.data_dir, "carol") as carol:
            assert next_of(alice, "presence") == {"type": "presence", "name": "carol", "online": True}
            assert request(carol, {"type": "leave", "channel": "#dev"}, 1)["type"] == "channels"
            assert next_of(alice, "membership") == {"type": "membership", "channel": "#dev", "name": "carol",
                                                    "joined": False}
            next_frame = request(alice, {"type": "ping"}, 2)  # the repeated join told nobody
            assert next_frame == {"type": "pong", "req": 2}


def test_the_watch_cap_refuses_a_watch_past_it_and_keeps_the_rest(extra_nodes, data_dir):
    node = extra_nodes("capped", max_watches=2)
    make_users(data_dir, "a", "b", "c")
    with logged_in_sockets(node.port, data_dir, "alice", "dave") as socks:
        alice = socks["alice"]
        assert request(alice, {"type": "watch", "names": ["a", "b"]}, 1)["type"] == "watch"
        refusal = request(alice, {"type": "watch", "names": ["c"]}, 2)
        assert (refusal["type"], refusal["code"]) == ("error", "watch_limit")
        assert "at most 2" in refusal["message"] and "unwatch" in refusal["message"]
        refusal = request(alice, {"type": "watch", "names": ["x"] * 3}, 6)  # longer than the cap itself
        assert (refusal["type"], refusal["code"]) == ("error", "watch_limit")
        # a lookup does not push past it either
        assert request(alice, {"type": "lookup", "name": "dave"}, 3)["type"] == "lookup"
        assert node.presence.watching("alice") == {"a", "b"}
        request(alice, {"type": "unwatch", "names": ["a"]}, 4)
        assert request(alice, {"type": "watch", "names": ["c"]}, 5)["type"] == "watch"
        assert node.presence.watching("alice") == {"b", "c"}
    # the watches end with the session
    wait_until(lambda: node.presence.watching("alice") == set(), timeout=5, message="watches to end")

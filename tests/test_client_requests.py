"""Requests and replies matched by request id, against a real node: concurrent
callers each get the reply to their own request, and a refusal reaches the
caller that asked instead of the inbox."""
from __future__ import annotations

import threading
import time

import pytest

from dm import crypto, datadir
from dm.client.core import ClientError, Events
from conftest import make_users

THREADS, ROUNDS = 8, 50


def run_together(count: int, work) -> list[BaseException]:
    """work(index, stop) in `count` threads started at once; the failures, the first of which stops the rest."""
    start, stop, failures = threading.Barrier(count), threading.Event(), []

    def run(index: int) -> None:
        start.wait()
        try:
            work(index, stop)
        except BaseException as exc:  # noqa: B036 (reported to the test below)
            failures.append(exc)
            stop.set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a caller is still waiting"
    return failures


def test_concurrent_callers_each_get_the_reply_to_their_own_request(tester_node):
    # The callers' lookups of unknown names are refusals, dozens within seconds: more than the
    # sliding error window (20 per 10 s) allows one connection. Matching replies is the point here.
    tester_node.node.max_errors = 10_000
    make_users(tester_node.data_dir, "alice", "bob")
    tester_node.client("bob")
    notices: list[str] = []
    alice = tester_node.client("alice", Events(notice=notices.append))
    bob_fingerprint = crypto.fingerprint(crypto.load_public_key(datadir.public_key_path(tester_node.data_dir, "bob")))
    done = [0] * THREADS

    def peers(t, i):
        names = alice.peers()
        assert {"alice", "bob"} <= set(names), names

    def channels(t, i):
        reply = alice.channels()
        assert reply["type"] == "channels" and "channel" not in reply, reply  # not a join's or leave's reply

    def join_and_leave(t, i):
        channel = f"#t{t}r{i}"
        joined = alice.join(channel)
        assert joined["channel"] == channel and channel in joined["joined"], (channel, joined)
        left = alice.leave(channel)
        assert left["channel"] == channel and channel not in left["joined"], (channel, left)

    def lookups(t, i):
        assert crypto.fingerprint(alice.peer_key("bob")) == bob_fingerprint
        with pytest.raises(ClientError, match=f"no user 'nobody-{t}-{i}'"):
            alice.peer_key(f"nobody-{t}-{i}")

    calls = [peers, channels, join_and_leave, lookups]

    def work(t: int, stop: threading.Event) -> None:
        mine = calls[t % len(calls):] + calls[:t % len(calls)]  # each thread in another order: all kinds overlap
        for i in range(ROUNDS):
            for call in mine:
                if stop.is_set():
                    return
                call(t, i)
                done[t] += 1

    failures = run_together(THREADS, work)
    assert not failures, f"{len(failures)} caller(s) got another's reply or none: {failures[0]!r}"
    assert sum(done) == THREADS * ROUNDS * len(calls)
    time.sleep(0.3)
    assert notices == []  # every reply and refusal went to its caller, none to the inbox


def test_a_refusal_reaches_the_caller_that_asked_not_the_inbox(tester_node):
    make_users(tester_node.data_dir, "alice")
    notices: list[str] = []
    alice = tester_node.client("alice", Events(notice=notices.append))
    with pytest.raises(ClientError, match=r"^you are not in #nowhere \(not_a_member\)$"):
        alice.leave("#nowhere")
    with pytest.raises(ClientError, match=r"^join #closed first \(not_a_member\)$"):
        alice.send_to_channel("#closed", "hello?")
    with pytest.raises(ClientError, match=r"^no user 'nobody' is known to this node \(unknown_peer\)$"):
        alice.peer_key("nobody")

    def leave_nowhere(t: int, stop: threading.Event) -> None:  # the same refusal for eight callers at once
        with pytest.raises(ClientError, match="you are not in #nowhere"):
            alice.leave("#nowhere")

    assert run_together(THREADS, leave_nowhere) == []
    assert alice.join("#after")["channel"] == "#after"  # and the session goes on
    time.sleep(0.3)
    assert notices == []

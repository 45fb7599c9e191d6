"""The node going away, as a user at the terminal meets it (issue 11): the real client.py in a
pseudo-terminal and a real client.py on a pipe, both talking through a real node.py on anvil.
The node is stopped with Ctrl-C (SIGINT) mid-conversation and started again on the same port;
then a message to a peer who is offline waits in the sender's outbox until that peer connects."""
from __future__ import annotations

import signal
import time

import pytest

from conftest import Process, cli_env, free_port, make_users, wait_until
from dm.chain import devchain
from test_terminal import Terminal

pytestmark = pytest.mark.e2e


def test_a_node_restart_and_an_offline_peer_cost_the_user_nothing_but_a_moment(tmp_path):
    make_users(tmp_path, "user_1", "user_2", "user_3")
    url = f"http://127.0.0.1:{free_port()}"
    env = {**cli_env(url, tmp_path), "NO_COLOR": "1"}
    port = free_port()
    node_args = ["node.py", "--host", "127.0.0.1", "--port", str(port), "--batch-wait", "0.2"]
    running: list = []
    try:
        _, anvil = devchain.ensure_chain(url, tmp_path)
        running.append(anvil)
        node = Process(node_args, env)
        running.append(node)
        node.wait_for_line(lambda line: line.startswith("node ready"), timeout=60)
        peer = Process(["client.py", "127.0.0.1", str(port), "user_2", "user_1"], env)
        running.append(peer)
        peer.wait_for_line(lambda line: line.startswith("connected to"), stream="errors")
        absent = Process(["client.py", "127.0.0.1", str(port), "user_3", "user_1"], env)  # known to the node
        absent.wait_for_line(lambda line: line.startswith("connected to"), stream="errors")
        absent.stop()
        term = Terminal(["client.py", "127.0.0.1", str(port), "user_1", "user_2"], env)
        running.append(term)
        term.wait_for("user_1 -> user_2>")
        term.wait_for("connected to")

        term.type("before the restart\r")
        wait_until(lambda: peer.lines == ["[user_1] before the restart"], timeout=30, message="the first line")

        node.stop(signal.SIGINT)  # Ctrl-C on the node
        term.wait_for("reconnecting", timeout=30)
        term.type("while the node was down\r")
        time.sleep(0.5)
        assert peer.lines == ["[user_1] before the restart"]  # nothing went anywhere yet

        node = Process(node_args, env)  # the same node, back on the same port and data directory
        running.append(node)
        node.wait_for_line(lambda line: line.startswith("node ready"), timeout=60)
        term.wait_for("(reconnected", timeout=30)
        wait_until(lambda: len(peer.lines) >= 2, timeout=30, message="the line typed while the node was down")
        time.sleep(1.0)  # a second copy would have arrived by now
        assert peer.lines == ["[user_1] before the restart", "[user_1] while the node was down"]
        term.wait_until(lambda lines: any("paid" in line and "while the node was down" in line for line in lines),
                        "the line typed while the node was down to be shown paid", timeout=30)

        # user_3 is offline: the line waits on user_1's side, and goes when user_3 connects
        term.type("/msg user_3 are you there?\r")
        term.wait_for("user_3 is offline: will deliver when user_3 connects", timeout=30)
        back = Process(["client.py", "127.0.0.1", str(port), "user_3", "user_1"], env)
        running.append(back)
        wait_until(lambda: back.lines, timeout=30, message="user_3 to receive the waiting line")
        time.sleep(1.0)
        assert back.lines == ["[user_1] are you there?"]
        assert not any("could not handle" in line for line in back.errors), back.errors
        assert "Traceback" not in term.transcript
    finally:
        for thing in reversed(running):
            thing.stop()

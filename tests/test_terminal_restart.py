"""The node going away, as a user at the terminal meets it (issue 11): the real client.py in a
pseudo-terminal and a real client.py on a pipe, both talking through a real node.py on anvil.
The node is stopped with Ctrl-C (SIGINT) mid-conversation and started again on the same port;
then a message to a peer who is offline waits in the sender's outbox until that peer connects.
Then what a session that starts or ends while the node is away, or with a line waiting for an
offline peer, does and says."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, Process, cli_env, free_port, make_users, wait_until
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


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    """anvil and node.py, for tests that stop the node and start it again (start_node()); users
    user_1..user_5, of whom user_2 and user_4 are known to the node (user_4 then offline)."""
    data = tmp_path_factory.mktemp("outage")
    make_users(data, "user_1", "user_2", "user_3", "user_4", "user_5")
    url = f"http://127.0.0.1:{free_port()}"
    world = {"env": {**cli_env(url, data), "NO_COLOR": "1"}, "port": free_port()}
    _, anvil = devchain.ensure_chain(url, data)
    try:
        start_node(world)
        for name in ("user_2", "user_4"):
            known = subprocess.run([PYTHON, "client.py", "127.0.0.1", str(world["port"]), name, "user_1"], cwd=ROOT,
                                   env=world["env"], input="", capture_output=True, text=True, timeout=120)
            assert known.returncode == 0, known.stderr
        yield world
    finally:
        world["node"].stop()
        anvil.stop()


def start_node(world: dict) -> Process:
    world["node"] = Process(["node.py", "--host", "127.0.0.1", "--port", str(world["port"]), "--batch-wait", "0.2"],
                            world["env"])
    world["node"].wait_for_line(lambda line: line.startswith("node ready"), timeout=60)
    return world["node"]


def start(world, started, me: str, peer: str, terminal: bool = True):
    """client.py as `me`, talking to `peer`: in a pseudo-terminal, or reading a pipe."""
    args = ["client.py", "127.0.0.1", str(world["port"]), me, peer]
    client = Terminal(args, world["env"]) if terminal else Process(args, world["env"])
    started.append(client)
    if terminal:
        client.wait_for("connected to", timeout=60)
    else:
        client.wait_for_line(lambda line: line.startswith("connected to"), stream="errors")
    return client


def said(term: Terminal) -> str:
    """What the terminal showed, escape sequences left out (the last words come after the screen closes)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.transcript)


def test_the_first_line_of_a_session_typed_while_the_node_is_away_is_queued_and_delivered(outage, started):
    """user_2's key is pinned on disk from an earlier session; this session has not looked it up
    yet when the node goes away. The line is paid for, sealed and kept, and arrives once the
    node is back (README: "A line you type while the node is away is paid for, sealed, and kept")."""
    earlier = subprocess.run([PYTHON, "client.py", "127.0.0.1", str(outage["port"]), "user_1", "user_2"], cwd=ROOT,
                             env=outage["env"], input="an earlier session pins user_2's key\n", capture_output=True,
                             text=True, timeout=120)
    assert earlier.returncode == 0, earlier.stderr
    receiver = start(outage, started, "user_2", "user_1", terminal=False)
    sender = start(outage, started, "user_1", "user_2")
    try:
        outage["node"].stop(signal.SIGINT)
        sender.wait_for("connection to the node lost", timeout=30)
        sender.type("typed while the node is away\r")
        sender.wait_for("[user_1 → user_2] typed while the node is away")
        sender.pump(1)
        assert not any("not sent" in line for line in sender.lines), "\n".join(sender.lines)
    finally:
        start_node(outage)
    receiver.wait_for_line(lambda line: line == "[user_1] typed while the node is away", timeout=60)


def test_quitting_while_the_node_is_away_says_the_lines_stay_queued_for_the_next_start(outage, started):
    receiver = start(outage, started, "user_2", "user_1", terminal=False)
    term = start(outage, started, "user_1", "user_2")
    term.type("before the outage\r")
    receiver.wait_for_line(lambda line: line == "[user_1] before the outage", timeout=60)
    try:
        outage["node"].stop(signal.SIGKILL)
        term.wait_for("connection to the node lost", timeout=30)
        term.type("while away 1\r")
        term.type("while away 2\r")
        term.wait_for("2 unacknowledged", timeout=30)
        term.type("exit\r")
        assert term.wait_exit(timeout=60) == 0
    finally:
        start_node(outage)
    last_words = said(term)
    assert "never acknowledged" not in last_words, last_words[-400:]
    assert re.search(r"\(2 message\(s\) stay queued on disk \(\S+outbox\.journal\): the node is away; they go out "
                     r"when you start the client again\)", last_words), last_words[-400:]


def test_quitting_with_a_line_for_an_offline_peer_says_it_goes_out_at_the_next_start(outage, started):
    term = start(outage, started, "user_5", "user_4")
    term.type("for user_4, who is offline\r")
    term.wait_for("user_4 is offline", timeout=60)
    term.type("exit\r")
    assert term.wait_exit(timeout=60) == 0
    assert "(1 message(s) wait in the queue for offline peers; they go out when you start the client again and " \
           "the peer is online)" in said(term), said(term)[-400:]

"""A user's session as the client library sees it, on a real node (in this process) and a real
EVM (eth-tester): what a clean exit leaves on disk, and what the user reads when the session
ends, when a key file is broken, and when a command names someone or something that is not there."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from conftest import make_users, wait_until
from dm.chain import ethereum
from dm.client.core import ChatClient, KeyFileProblem
from dm.relay.node import Node


def book_records(data_dir, name: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in (data_dir / "clients" / name / "books").glob("*.json")]


def test_a_clean_exit_saves_the_books_real_cursor_so_the_next_run_spends_the_next_leaf(tester_node):
    """The cursor is saved ahead of use (a crash must never reuse a code), but a clean exit writes
    back the real next unused leaf: one message per run spends one leaf, not one book every 3 runs."""
    make_users(tester_node.data_dir, "dave", "carol")
    tester_node.client("carol")
    indices = []
    for run in range(1, 4):
        dave = tester_node.client("dave", book_size=100)
        dave.send_text("carol", f"m{run}")
        assert dave.wait_acknowledged(timeout=10)
        indices.append(dave.last_bounty["index"])
        dave.close()
        records = book_records(tester_node.data_dir, "dave")
        assert len(records) == 1 and records[0]["cursor"] == run, records
    assert indices == [0, 1, 2]


def chat_session(running_node, me: str, peer: str, painter=None, **options):
    """A Chat (what the terminal shows, with `painter`: as on a terminal) on a ChatClient logged
    in as `me`; and the lines shown."""
    from dm.client.commands import Chat
    from dm.client.core import Events

    shown: list[str] = []
    chat = Chat(me, peer, lambda line, notice: shown.append(line), painter)
    events = Events(**{name: handler for name, handler in chat.handlers().items()
                       if name in Events.__dataclass_fields__})
    if isinstance(running_node, Node):
        client = ChatClient("127.0.0.1", running_node.port, me, options.pop("data_dir"), rpc_url=ethereum.TESTER_URL,
                            events=events, w3=running_node.token.w3, **options)
        client.connect()
    else:
        client = running_node.client(me, events=events, **options)
    chat.attach(client)
    return chat, client, shown


def test_a_session_taken_over_by_the_same_name_says_so_not_that_the_node_went_away(tester_node):
    make_users(tester_node.data_dir, "user_1", "user_2")
    _, first, shown = chat_session(tester_node, "user_2", "user_1")
    tester_node.client("user_2")  # user_2 logs in again, from elsewhere
    wait_until(lambda: first.is_closed, timeout=10, message="the first session to end")
    said = [line for line in shown if "disconnected" in line]
    assert len(said) == 1 and "(name_in_use)" in said[0], shown
    assert "logged in elsewhere" in said[0] and "once the node is back" not in said[0], said


def test_giving_up_reconnecting_is_said_once(extra_nodes, data_dir):
    node = extra_nodes("short-lived")
    make_users(data_dir, "alice")
    _, alice, shown = chat_session(node, "alice", "alice", data_dir=data_dir, reconnect_for=0.5,
                                   reconnect_max_delay=0.1)
    try:
        node.stop()
        wait_until(lambda: alice.is_closed, timeout=10, message="alice to give up")
        time.sleep(0.2)
        gave_up = [line for line in shown if "gave up" in line]
        assert len(gave_up) == 1 and gave_up[0].count("gave up") == 1, shown
        assert "stay queued on disk" in gave_up[0] and "quit with exit" in gave_up[0], gave_up
    finally:
        alice.close()


def test_who_for_a_channel_you_are_not_in_says_whether_it_is_open(tester_node):
    make_users(tester_node.data_dir, "user_1", "user_2")
    tester_node.client("user_2").join("#dev")
    chat, _, shown = chat_session(tester_node, "user_1", "user_2")
    chat.handle_lines(["/who #nosuch", "/who #dev"])
    assert shown[0].startswith("error: no channel #nosuch is open") and "/join #nosuch" in shown[0], shown
    assert shown[1].startswith("error: you are not in #dev (1 member)") and "/join #dev" in shown[1], shown


def test_the_readme_quotes_the_reconnect_lines_the_client_prints():
    from conftest import ROOT
    from dm.client.commands import HELP, Chat

    shown: list[str] = []
    chat = Chat("user_1", "user_2", lambda line, notice: shown.append(line))
    chat.on_connection("lost", "the node closed the connection")
    chat.on_connection("reconnecting", "2 queued")
    chat.on_connection("reconnected", "localhost:12345")
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(shown) in readme, shown
    who_help = next(line for line in HELP.splitlines() if line.strip().startswith("/who"))
    who_readme = next(line for line in readme.splitlines() if line.startswith("| `/who #chan`"))
    assert "your channels" in who_help and "your channels" in who_readme


@pytest.mark.parametrize("damage, expected", [
    (lambda keys: (keys / "user_1_ETH.key").write_text(""), "user_1_ETH.key is empty"),
    (lambda keys: (keys / "user_1_ETH.key").write_text("not hex at all\n"),
     "user_1_ETH.key does not hold an Ethereum private key"),
    (lambda keys: (keys / "user_1_ETH.key").unlink(), "user_1_ETH.key is missing"),
    (lambda keys: (keys / "user_1_PRIVATE.pem").write_text("-----BEGIN garbage"), "user_1_PRIVATE.pem"),
])
def test_a_broken_key_file_is_named_with_what_to_do(data_dir, damage, expected):
    make_users(data_dir, "user_1")
    damage(data_dir / "keys")
    with pytest.raises(KeyFileProblem) as problem:
        ChatClient("127.0.0.1", 1, "user_1", data_dir)
    said = str(problem.value)
    assert expected in said and "\n" not in said, said
    assert "restore it from a backup" in said and "main.py Y user_1" in said, said
    for name in ("user_1_PRIVATE.pem", "user_1_PUBLIC.pem", "user_1_ETH.key"):  # what to move away
        assert name in said, said


def test_a_client_with_an_empty_key_file_says_one_line_not_a_traceback(tmp_path):
    """client.py as a user runs it: the node probe passes (something listens), then the keys fail."""
    from conftest import PYTHON, ROOT, cli_env

    make_users(tmp_path, "user_1")
    (tmp_path / "keys" / "user_1_ETH.key").write_text("")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        done = subprocess.run([PYTHON, "client.py", "127.0.0.1", str(listener.getsockname()[1]), "user_1", "user_2"],
                              cwd=ROOT, env=cli_env("http://127.0.0.1:9", tmp_path), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "user_1_ETH.key is empty" in done.stderr, done.stderr


def test_to_an_unknown_name_is_refused_at_once_not_at_the_next_send(tester_node):
    make_users(tester_node.data_dir, "user_1", "user_2")
    tester_node.client("user_2")
    chat, _, shown = chat_session(tester_node, "user_1", "user_2")
    chat.handle_lines(["/to nobody"])
    assert shown == ["error: no user 'nobody' is known to this node (unknown_peer)"] and chat.peer == "user_2"
    chat.handle_lines(["/to user_2", "/to #dev"])
    assert shown[1:] == ["(now talking to user_2)", "(now talking to #dev)"] and chat.peer == "#dev"


def test_leave_alone_while_talking_to_a_person_says_to_name_the_channel(tester_node):
    make_users(tester_node.data_dir, "user_1", "user_2")
    tester_node.client("user_2")
    chat, _, shown = chat_session(tester_node, "user_1", "user_2")
    chat.handle_lines(["/leave"])
    assert shown == ["error: usage: /leave #channel (you are talking to user_2, not to a channel)"], shown


def test_paid_for_a_channel_line_quotes_it_once_however_many_copies_went(tester_node):
    from dm.client.scroll import Painter

    make_users(tester_node.data_dir, "user_1", "user_2", "user_3")
    for member in ("user_2", "user_3"):
        tester_node.client(member).join("#room")
    chat, _, shown = chat_session(tester_node, "user_1", "user_2", Painter("user_1", colour=False))
    chat.handle_lines(["/join #room", "one line", "same", "same"])
    wait_until(lambda: chat.paid_messages == 6, timeout=30, message="all six copies to be paid")
    paid = [line.split(" ", 1)[1] for line in shown if "✓ paid" in line]
    quotes = " ".join(paid)
    assert quotes.count("“one line”") == 1 and quotes.count("“same”") == 2, paid  # two lines of one text

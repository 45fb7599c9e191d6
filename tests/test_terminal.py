"""The interactive client as a user meets it: the real client.py in a pseudo-terminal
(pexpect), its screen rendered by a terminal emulator (pyte) that answers cursor
position requests as a real terminal does, against a real node.py on anvil; the
peer is a real client.py reading a pipe. Also the entry points' start-up: Ctrl-C,
errors that name the next step, and re-running under .venv."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pyte
import pytest

from conftest import PYTHON, ROOT, Process, cli_env, free_port, logged_in_sockets, make_users, wait_until
from dm import wire
from dm.chain import devchain
from test_abuse import read_frame

pytestmark = pytest.mark.e2e

ROWS, COLUMNS = 24, 100
CPR_REQUEST = "\x1b[6n"  # prompt_toolkit asks where the cursor is, to place its toolbar


class Terminal:
    """client.py (or any entry point) in a pseudo-terminal, with the screen a user would see."""

    def __init__(self, args: list[str], env: dict):
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.Stream(self.screen)
        self.transcript = ""  # everything written to the terminal, escapes included
        self.child = pexpect.spawn(PYTHON, args, cwd=str(ROOT), env={**env, "TERM": "xterm"},
                                   dimensions=(ROWS, COLUMNS), encoding="utf-8", codec_errors="replace")

    def pump(self, seconds: float = 0.0) -> None:
        """Reads what the program wrote for `seconds` (at least once), answering cursor requests."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                data = self.child.read_nonblocking(65536, timeout=0.05)
            except pexpect.TIMEOUT:
                data = ""
            except pexpect.EOF:
                return
            self.transcript += data
            *before, after = data.split(CPR_REQUEST)
            for part in before:
                self.stream.feed(part)
                self.child.send(f"\x1b[{self.screen.cursor.y + 1};{self.screen.cursor.x + 1}R")
            self.stream.feed(after)
            if time.monotonic() >= deadline:
                return

    @property
    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if any(text in line for line in self.lines):
                return
            if not self.child.isalive():
                break
        raise AssertionError(f"{text!r} never showed; the screen:\n" + "\n".join(self.lines))

    def wait_until(self, predicate, what: str, timeout: float = 10) -> None:
        """Until predicate(screen lines) holds: a redraw comes a moment after the line that caused it."""
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            if time.monotonic() > deadline or not self.child.isalive():
                raise AssertionError(f"{what}; the screen:\n" + "\n".join(self.lines))
            self.pump()

    def type(self, keys: str, settle: float = 0.2) -> None:
        self.child.send(keys)
        self.pump(settle)

    def wait_exit(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.child.isalive() and time.monotonic() < deadline:
            self.pump()
        self.pump()
        self.child.close(force=True)
        return self.child.exitstatus if self.child.exitstatus is not None else -(self.child.signalstatus or 0)

    def stop(self) -> None:
        if self.child.isalive():
            self.child.close(force=True)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """For the whole module: node.py (which starts its own anvil), users user_1..user_3, and
    user_2 as a client.py on a pipe, talking to user_1 (its stdout is what user_2 received)."""
    data = tmp_path_factory.mktemp("terminal")
    make_users(data, "user_1", "user_2", "user_3")
    url = f"http://127.0.0.1:{free_port()}"
    env = {**cli_env(url, data), "NO_COLOR": "1"}
    port = free_port()
    running: list = []
    try:
        _, anvil = devchain.ensure_chain(url, data)  # ours, so that the last test can stop it
        running.append(anvil)
        node = Process(["node.py", "--host", "127.0.0.1", "--port", str(port), "--batch-wait", "0.2"], env)
        running.append(node)
        node.wait_for_line(lambda l: l.startswith("node ready"), timeout=60)
        peer = Process(["client.py", "127.0.0.1", str(port), "user_2", "user_1"], env)
        running.append(peer)
        peer.wait_for_line(lambda l: l.startswith("connected to"), stream="errors")
        yield {"env": env, "port": port, "data": data, "node": node, "peer": peer, "anvil": anvil}
    finally:
        for process in reversed(running):
            process.stop()


def received_since(peer: Process, mark: int) -> list[str]:
    return peer.lines[mark:]


def terminal_client(chat, started, me: str, peer: str, *extra: str) -> Terminal:
    term = Terminal(["client.py", "127.0.0.1", str(chat["port"]), me, peer, *extra], chat["env"])
    started.append(term)
    term.wait_for(f"{me} -> {peer}>")
    term.wait_for("connected to")
    return term


def prompts_on(term: Terminal, me: str) -> list[str]:
    return [line for line in term.lines if f"{me} -> " in line]


def test_commands_leave_one_prompt_and_chat_conventions_hold(chat, started):
    peer, mark = chat["peer"], len(chat["peer"].lines)
    term = terminal_client(chat, started, "user_1", "user_2")
    for command, answer, prompt in [("/peers", "online:", "user_1 -> user_2>"),
                                    ("/help", "exit                quit", "user_1 -> user_2>"),
                                    ("/JOIN #Dev", "joined #dev", "user_1 -> #dev>"),  # switches; lower case
                                    ("/who", "#dev: online user_1", "user_1 -> #dev>"),
                                    ("/To user_2", "now talking to user_2", "user_1 -> user_2>")]:
        term.type(command + "\r")
        term.wait_for(answer)
        term.wait_until(lambda lines: prompt in lines, f"no {prompt!r} after {command}")
        term.pump(0.3)  # anything drawn late would show now
        assert prompts_on(term, "user_1") == [prompt], f"after {command}:\n" + "\n".join(term.lines)

    toolbar = term.lines[-1]
    assert "to user_2" in toolbar and "connected" in toolbar and "BTK" in toolbar and "unacknowledged" in toolbar

    term.type("/jo\t")  # Tab completes commands, then channels and names
    term.wait_until(lambda lines: "user_1 -> user_2> /join" in lines, "Tab did not complete /jo")
    term.type("\x15/msg us\t")  # (Ctrl-U clears the line first)
    term.wait_until(lambda lines: "user_1 -> user_2> /msg user_2" in lines, "Tab did not complete us")
    term.type("\x15")

    for line in ["", "   ", "quit", "/msg user_2 direct line", "/me waves", "//slash at the start",
                 "héllo, 日本 ✓"]:
        term.type(line + "\r")
    peer.wait_for_line(lambda l: l == "[user_1] héllo, 日本 ✓")
    assert received_since(peer, mark) == ["[user_1] quit", "[user_1] direct line", "[user_1] /me waves",
                                          "[user_1] /slash at the start", "[user_1] héllo, 日本 ✓"]  # no blanks
    term.wait_for("* user_1 waves")
    term.wait_for("✓ paid")
    term.wait_for("opened a book of 100 codes: 100 BTK escrowed until")

    term.type("/balance\r")
    term.wait_for("balance 9,")
    assert any("escrowed" in line for line in term.lines if "balance 9," in line)

    term.type("EXIT\r")  # commands are case-insensitive
    assert term.wait_exit() == 0
    assert "Traceback" not in term.transcript
    assert term.transcript.rfind("\x1b[?25h") > term.transcript.rfind("\x1b[?25l")  # the cursor is shown again
    history = chat["data"] / "clients" / "user_1" / "history"  # up/down history, kept per user
    assert history.stat().st_mode & 0o777 == 0o600 and "/msg user_2 direct line" in history.read_text()


def test_mid_line_edit_sends_what_the_screen_shows(chat, started):
    peer, mark = chat["peer"], len(chat["peer"].lines)
    term = terminal_client(chat, started, "user_1", "user_2")
    term.type("abcdef")
    term.type("\x1b[D" * 3)  # ← three times: the cursor is after "abc"
    peer.write("a message while you type\n")
    term.wait_for("[user_2] a message while you type")
    term.wait_until(lambda lines: prompts_on(term, "user_1"), "the prompt was not redrawn")
    assert prompts_on(term, "user_1") == ["user_1 -> user_2> abcdef"]  # the typed text, intact
    term.type("X\r")
    wait_until(lambda: received_since(peer, mark), message="user_2 to receive the edited line")
    assert received_since(peer, mark) == ["[user_1] abcXdef"]
    term.wait_for("[user_1 → user_2] abcXdef")
    assert not any("abcdefX" in line for line in term.lines)

    wide = "L" * 70 + "M" * 70  # wider than the terminal: the input wraps onto two rows
    term.type(wide)
    peer.write("another one\n")
    term.wait_for("[user_2] another one")
    term.wait_for("user_1 -> user_2> LLLL")  # redrawn below the new line
    assert sum("LLLLLLLLLL" in line for line in term.lines) == 1, "\n".join(term.lines)  # no rows left behind
    term.type("\r")
    wait_until(lambda: len(received_since(peer, mark)) == 2, message="the wide line")
    assert received_since(peer, mark)[1] == f"[user_1] {wide}"

    term.type("\x04")  # Ctrl-D quits and leaves the terminal clean
    assert term.wait_exit() == 0
    assert "Traceback" not in term.transcript
    assert not any("user_1 -> " in line for line in term.lines)  # the prompt is gone, not left on the line

    refund = subprocess.run([PYTHON, "main.py", "refund", "user_1"], cwd=ROOT, env=chat["env"], capture_output=True,
                            text=True, timeout=60)
    assert refund.returncode == 0, refund.stderr
    assert "BTK escrowed until" in refund.stdout and "still escrowed in 1 book(s)" in refund.stdout, refund.stdout


@pytest.mark.parametrize("script, after", [("client.py", 0.3), ("client.py", 1.5), ("node.py", 1.0)])
def test_ctrl_c_during_start_up_exits_without_a_traceback(chat, started, tmp_path, script, after):
    if script == "client.py":
        args = ["client.py", "127.0.0.1", str(chat["port"]), "user_3", "user_1"]
        env = chat["env"]
    else:  # a node of its own, on a chain of its own: Ctrl-C may land while it starts anvil
        args = ["node.py", "--host", "127.0.0.1", "--port", str(free_port())]
        env = cli_env(f"http://127.0.0.1:{free_port()}", tmp_path)
    term = Terminal(args, env)
    started.append(term)
    term.pump(after)
    term.type("\x03")
    status = term.wait_exit(timeout=30)
    assert "Traceback" not in term.transcript and "KeyboardInterrupt" not in term.transcript, term.transcript
    assert status in (0, 130), status


def test_errors_name_the_next_step(chat):
    def run(args, env=chat["env"]):
        done = subprocess.run([PYTHON, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=90)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        return done.stderr

    in_use = run(["node.py", "--host", "127.0.0.1", "--port", str(chat["port"])])
    assert f"another node (or program) is running on port {chat['port']}" in in_use and "--port" in in_use

    nobody_there = free_port()
    refused = run(["client.py", "127.0.0.1", str(nobody_there), "user_1", "user_2"])
    assert "Connection refused" in refused and f"start it first (`python3 node.py --port {nobody_there}`)" in refused.lower()

    no_keys = run(["client.py", "127.0.0.1", str(chat["port"]), "nobody", "user_2"])
    assert "run `python3 main.py Y nobody` first" in no_keys

    chain_port = chat["anvil"].url.rsplit(":", 1)[1]
    not_a_node = run(["client.py", "127.0.0.1", chain_port, "user_3", "user_2"])  # the chain's port, a mix-up
    assert f"127.0.0.1:{chain_port} is not a DistributedMessaging node: it answered with something else (it " \
           "speaks HTTP: is that the chain's port?). Check the host and port" in not_a_node, not_a_node

    # name_taken itself is refused end to end in test_e2e (the impostor); here, its wording.
    from argparse import Namespace

    from dm.client.terminal import explain

    taken = explain("the node refused us: the name 'user_2' is pinned to another key on this node (name_taken)",
                    Namespace(me="user_2", host="127.0.0.1", port=chat["port"]))
    assert "use your original keys" in taken and "or another name" in taken
    assert taken.count("pinned to another key") == 1, taken
    # The node went away between the start-up probe and the connection: its advice once, not twice.
    gone = explain("cannot reach the node at 127.0.0.1:9: Connection refused: start node.py first, or check the "
                   "host and port", Namespace(me="user_2", host="127.0.0.1", port=9))
    assert gone.lower().count("start") == 1 and gone.count("check the host and port") == 1, gone


def test_a_second_client_of_one_name_on_one_data_directory_is_refused_and_the_first_goes_on(chat):
    """Two client.py of one name on one data directory would spend the same book leaves and
    overwrite each other's outbox; the second one says which process to use instead."""
    peer = chat["peer"]
    mark = len(peer.errors)
    done = subprocess.run([PYTHON, "client.py", "127.0.0.1", str(chat["port"]), "user_2", "user_1"], cwd=ROOT,
                          env=chat["env"], input="hello twice\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert f"user_2 is already running from {chat['data']} (pid {peer.proc.pid})" in done.stderr, done.stderr
    assert "use that one, or quit it (exit) first" in done.stderr, done.stderr
    # A refund would send transactions from the account the running client pays from.
    refund = subprocess.run([PYTHON, "main.py", "refund", "user_2"], cwd=ROOT, env=chat["env"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert refund.returncode == 1 and "Traceback" not in refund.stderr, refund.stderr
    assert f"user_2's client.py is running from {chat['data']} (pid {peer.proc.pid}): quit it (exit) first, " \
           "then refund" in refund.stderr, refund.stderr
    time.sleep(1)
    assert not any("disconnected" in line for line in peer.errors[mark:]), peer.errors[mark:]


def test_piped_lines_that_were_not_sent_make_the_exit_status_non_zero(chat):
    done = subprocess.run([PYTHON, "client.py", "127.0.0.1", str(chat["port"]), "user_3", "user_2"], cwd=ROOT,
                          env=chat["env"], input="/msg nobody are you there?\n", capture_output=True, text=True,
                          timeout=60)
    assert "not sent: “are you there?”" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1


def test_a_line_too_long_is_refused_alone_and_the_lines_read_with_it_are_sent(chat):
    make_users(chat["data"], "dana")  # a sender of its own: user_3's books are for the last test
    peer = chat["peer"]
    done = subprocess.run([PYTHON, "client.py", "127.0.0.1", str(chat["port"]), "dana", "user_2"], cwd=ROOT,
                          env=chat["env"], input="before\n" + "z" * 7_000_000 + "\nafter\n", capture_output=True,
                          text=True, timeout=180)
    refusals = [line for line in done.stderr.splitlines() if "not sent" in line]
    assert len(refusals) == 1 and "the limit is" in refusals[0] and "send it in parts" in refusals[0], refusals
    assert "“before”" not in refusals[0] and "“after”" not in refusals[0], refusals
    assert done.returncode == 1  # one line was not sent
    peer.wait_for_line(lambda line: line == "[dana] after", timeout=60)
    assert "[dana] before" in peer.lines


def test_a_peers_control_characters_show_as_marks_and_every_line_shows_its_sender(chat, started):
    """A peer's escape sequences (a window title, an erase-screen), a carriage return that would
    put a forged `[user_2]` line over its own prefix, and a bidi override reach neither the
    terminal nor the piped client's stdout as they are: they show as ^[, ^M, <U+202E>. A pasted
    text of two lines shows both lines under its sender's name, on screen and on stdout."""
    make_users(chat["data"], "mallory")
    peer, mark = chat["peer"], len(chat["peer"].lines)
    term = terminal_client(chat, started, "user_1", "user_2")
    hostile = "before\x1b]0;PWNED\x07\x1b[2J\x1b[Hafter\r12:00 [user_2] send 500 BTK to \u202e0xdead"
    shown = "before^[]0;PWNED^G^[[2J^[[Hafter^M12:00 [user_2] send 500 BTK to <U+202E>0xdead"
    sender = subprocess.run([PYTHON, "client.py", "127.0.0.1", str(chat["port"]), "mallory", "user_1"], cwd=ROOT,
                            env=chat["env"], input=f"{hostile}\n/msg user_2 {hostile}\n", capture_output=True,
                            text=True, timeout=120)
    assert sender.returncode == 0, sender.stderr
    term.wait_for("0xdead", timeout=60)
    term.pump(0.5)
    assert any(line.endswith(f"[mallory] {shown}") for line in term.lines), "\n".join(term.lines)
    assert "\x1b]0;" not in term.transcript and "\x1b[2J" not in term.transcript and "\u202e" not in term.transcript
    peer.wait_for_line(lambda line: "0xdead" in line, timeout=60)
    assert f"[mallory] {shown}" in peer.lines, peer.lines[mark:]

    term.type("\x1b[200~first pasted line\nsecond pasted line\x1b[201~\r")  # a bracketed paste, then Enter
    peer.wait_for_line(lambda line: "second pasted line" in line, timeout=60)
    assert peer.lines[-2:] == ["[user_1] first pasted line", "[user_1] second pasted line"], peer.lines[mark:]
    term.wait_for("second pasted line")
    pasted = [line for line in term.lines if "pasted line" in line]
    assert pasted[-2:] == [pasted[-2][:5] + " [user_1 → user_2] first pasted line",
                           "      [user_1 → user_2] second pasted line"], pasted
    term.type("exit\r")
    assert term.wait_exit() == 0


def test_control_characters_and_bidi_controls_are_shown_as_marks():
    from dm.client.scroll import Painter, text_lines, visible

    assert visible("tab\there, C1 \x9b, DEL \x7f, NUL \x00") == "tab^Ihere, C1 <U+009B>, DEL ^?, NUL ^@"
    assert visible("\u202aa\u202bb\u202cc\u202dd\u202ee\u2066f\u2067g\u2068h\u2069") == \
        "<U+202A>a<U+202B>b<U+202C>c<U+202D>d<U+202E>e<U+2066>f<U+2067>g<U+2068>h<U+2069>"
    assert visible("héllo, 日本 ✓ \u200d") == "héllo, 日本 ✓ \u200d"  # printable text and joiners stay
    assert text_lines("one\r\ntwo\nthree\r") == ["one", "two", "three^M"]
    plain = Painter("me", False, clock=lambda: 0)
    assert plain.message("al\x1bice", "/me waves\nand\x07 bows", "#dev").splitlines()[1] == \
        "      * #dev al^[ice and^G bows"
    assert plain.notice("bad\nnews").endswith(" bad^Jnews")


def test_entry_points_rerun_under_the_venv_or_say_what_to_run(tmp_path):
    bare = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter the venv was made from
    probe = subprocess.run([str(bare), "-c", "import web3"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the base python has web3 installed: nothing to re-run")
    for script in ("client.py", "node.py", "main.py"):
        done = subprocess.run([str(bare), script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "usage:" in done.stdout, (script, done.stderr)

    no_venv = ("import sys; from pathlib import Path; import dm.cli.bootstrap as b; b.VENV = Path(sys.argv[1]); "
               "sys.argv = ['client.py']; b.run('dm.cli.client')")
    done = subprocess.run([str(bare), "-c", no_venv, str(tmp_path / "no-venv")], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "run `make setup`" in done.stderr


def test_a_client_without_rpc_url_uses_the_chain_in_its_deployment_record(tmp_path, monkeypatch):
    from dm.cli.client import parse_args, resolve_rpc_url

    monkeypatch.delenv("DM_RPC_URL", raising=False)
    args = parse_args(["localhost", "12345", "user_1", "user_2", "--data-dir", str(tmp_path)])
    resolve_rpc_url(args)
    assert args.rpc_url == "http://127.0.0.1:8545"  # no record yet: the default
    (tmp_path / "deployment.json").write_text('{"chain_id": 31337, "rpc_url": "http://127.0.0.1:9999", '
                                              '"address": "0x0", "deploy_block": 1}')
    args.rpc_url = None
    resolve_rpc_url(args)
    assert args.rpc_url == "http://127.0.0.1:9999" and "deployment record" in args.rpc_source
    monkeypatch.setenv("DM_RPC_URL", "http://127.0.0.1:7777")
    args.rpc_url = None
    resolve_rpc_url(args)
    assert args.rpc_url == "http://127.0.0.1:7777"


def test_colour_per_sender_unless_no_color():
    from dm.client.scroll import Painter, colour_wanted

    assert colour_wanted({"TERM": "xterm"}) and not colour_wanted({"TERM": "xterm", "NO_COLOR": "1"})
    coloured, plain = Painter("me", True, clock=lambda: 0), Painter("me", False, clock=lambda: 0)
    assert "\x1b[" in coloured.message("alice", "hi") and "\x1b[" not in plain.message("alice", "hi")
    assert coloured.sender("alice") == coloured.sender("alice") != coloured.sender("bob")
    assert plain.message("alice", "/me waves", "#dev").endswith("* #dev alice waves")


def test_a_chain_outage_is_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    from dm.chain import ethereum
    from dm.relay.outage import ChainOutage

    down = ethereum.connect(f"http://127.0.0.1:{free_port()}", timeout=2)  # nothing listens there
    outage = ChainOutage()
    with caplog.at_level(logging.INFO, logger="node"):
        for _ in range(5):  # the redeemer and the index retry every second
            with pytest.raises(Exception) as failure:
                down.eth.chain_id
            assert outage.failed(failure.value, "codes wait")
        outage.answered()
        outage.answered()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert "does not answer" in lines[0] and "main.py chain" in lines[0] and "answers again" in lines[1]


def test_channel_names_are_case_insensitive_at_the_node(chat):
    def ask(sock, message: dict) -> dict:
        sock.sendall(wire.encode({**message, "req": 1}))
        while (reply := read_frame(sock)).get("req") != 1:
            pass
        return reply

    with logged_in_sockets(chat["port"], chat["data"], "alice", "bob") as socks:
        assert ask(socks["alice"], {"type": "join", "channel": "#Dev"})["channel"] == "#dev"
        ask(socks["bob"], {"type": "join", "channel": "#dEV"})
        members = ask(socks["alice"], {"type": "members", "channel": "#DEV"})
        assert members["channel"] == "#dev" and members["online"] == ["alice", "bob"]


def test_a_hanging_chain_leaves_the_prompt_usable_and_ends_in_a_plain_error(chat, started):
    """The chain stops answering (SIGSTOP: it still accepts connections, and never replies).
    /balance and a first message (which opens a book) wait for it off the prompt: the prompt and
    the toolbar stay, typing goes on, the user is told what is awaited, and after the client's
    chain timeout ($DM_CHAIN_TIMEOUT, 2 s here) each ends in one plain error. The unsent line
    is quoted, and up-arrow brings it back to send once the chain answers again."""
    make_users(chat["data"], "erin")  # no book yet: the first message opens one
    peer, mark = chat["peer"], len(chat["peer"].lines)
    term = Terminal(["client.py", "127.0.0.1", str(chat["port"]), "erin", "user_2"],
                    {**chat["env"], "DM_CHAIN_TIMEOUT": "2"})
    started.append(term)
    term.wait_for("erin -> user_2>")
    term.wait_for("connected to")
    anvil = chat["anvil"].proc.pid
    os.kill(anvil, signal.SIGSTOP)
    try:
        term.type("/balance\r")
        term.type("still typing")
        term.wait_until(lambda lines: "erin -> user_2> still typing" in lines, "the prompt froze", timeout=1.5)
        assert "to user_2" in term.lines[-1]  # the toolbar too
        term.wait_for("(waiting for the chain", timeout=3)
        term.wait_for("error: could not read the chain", timeout=6)
        term.type("\x15first message\r")
        term.wait_for("not sent", timeout=8)
        assert re.search(r"error: could not pay for the message: the chain at \S+ did not answer within 2s\. "
                         r"[^\n]*; not sent: “first message” \(up-arrow brings it back\)", term.transcript)
        for raw in ("HTTPConnectionPool", "Read timed out", "read timeout"):
            assert raw not in term.transcript
    finally:
        os.kill(anvil, signal.SIGCONT)
    term.type("\x1b[A")  # up: the line that was not sent
    term.wait_until(lambda lines: "erin -> user_2> first message" in lines, "up did not bring the line back")
    term.type("\r")
    peer.wait_for_line(lambda line: line == "[erin] first message", timeout=30)
    assert received_since(peer, mark) == ["[erin] first message"]
    term.type("exit\r")
    assert term.wait_exit() == 0 and "Traceback" not in term.transcript


def test_the_chain_going_away_costs_an_error_line_not_the_client(chat, started):
    """Last in this module: it stops the chain. A message that needs a new book says the chain
    is down and what to run, the client lives on, and the node logs the outage once."""
    term = terminal_client(chat, started, "user_3", "user_2", "--book-size", "1")  # a new book per message
    term.type("paid from the first book\r")
    term.wait_for("✓ paid")
    chat["anvil"].stop()
    term.type("needs a new book\r")
    term.wait_for("error: could not pay for the message", timeout=60)
    assert any("`python3 main.py chain`" in line for line in term.lines), term.lines
    term.wait_until(lambda lines: "user_3 -> user_2>" in lines, "the client did not carry on")
    time.sleep(2.5)  # the node retries every second meanwhile
    outage = [l for l in chat["node"].lines + chat["node"].errors if "does not answer" in l]
    assert len(outage) == 1 and "main.py chain" in outage[0], outage
    term.type("exit\r")
    assert term.wait_exit() == 0 and "Traceback" not in term.transcript

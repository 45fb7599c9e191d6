"""The terminal client.

    python3 client.py HOST PORT ME PEER      e.g. python3 client.py localhost 12345 user_1 user_2

On a terminal: prompt_toolkit, with incoming lines printed above the input
(patch_stdout), a bottom toolbar, Tab completion and per-user history. The
prompt appears at once; the client (web3 and all) starts behind it, and lines
typed meanwhile wait for it. Typed lines are handled on a thread of their own,
in order, so that the prompt stays usable while one waits for the chain.

When stdin is not a terminal, lines are read and sent one by one, received
messages go to stdout as `[sender] text`, notices to stderr, and at end of
input the client waits until its messages are acknowledged (a node that is
away gets AWAY_WAIT seconds to come back), then exits: 1 if a line was not
sent, else 0 (lines still queued on disk go out at the next start).
"""
from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from pathlib import Path

from dm import datadir
from dm.client import rpc
from dm.client.commands import Chat, is_quit
from dm.client.errors import ClientError
from dm.client.scroll import visible

QUIT_WAIT = 10  # seconds an interactive client waits at exit for its last messages' receipts
ACK_WAIT = 120  # seconds piped input waits at its end for the node to answer its messages
AWAY_WAIT = 5.0  # ... and for a node that is away to come back: the messages wait on disk anyway
SAY_WAITING_AFTER = 1.0  # seconds a typed line may wait for the chain before the user is told
HISTORY_FILE = "history"  # under clients/NAME/: the lines typed, for up/down (0600)


def run(args) -> int:
    if sys.stdin.isatty() and sys.stdout.isatty():
        return run_interactive(args)
    return run_lines(args)


def start_client(args, chat: Chat):
    """A connected ChatClient with `chat` handling its events. Raises ClientError that says what to do."""
    from dm.chain.ethereum import ChainError
    from dm.client.core import ChatClient, Events

    handlers = {name: handler for name, handler in chat.handlers().items() if name in Events.__dataclass_fields__}
    data_dir = datadir.resolve(args.data_dir)
    try:
        client = ChatClient(args.host, args.port, args.me, data_dir, rpc_url=args.rpc_url, pay=args.pay,
                            book_size=args.book_size, events=Events(**handlers), addresses=args.addresses,
                            reconnect_for=args.reconnect_for, reconnect_max_delay=args.reconnect_max_delay,
                            release_timeout=args.release_timeout,
                            chain_timeout=getattr(args, "chain_timeout", None) or rpc.chain_timeout())
        client.connect()
    except ClientError as exc:
        raise ClientError(explain(visible(str(exc)), args)) from None  # it may quote the node
    except OSError as exc:
        if exc.filename is None:  # requests' errors are OSErrors too, and name no file
            raise ClientError(explain(f"cannot reach the chain at {args.rpc_url}: {exc}", args)) from None
        raise ClientError(disk_problem(exc, datadir.client_dir(data_dir, args.me))) from None
    except ChainError as exc:
        raise ClientError(explain(f"cannot reach the chain at {args.rpc_url}: {exc}", args)) from None
    chat.attach(client)
    return client


def disk_problem(exc: OSError, client_dir: Path) -> str:
    """A file the client could not make or open at start-up, and what to do about it."""
    return (f"cannot use {exc.filename}: {exc.strerror or exc}. The client keeps {client_dir.name}'s files in "
            f"{client_dir}: make sure it and the folders in it are directories you can write (move away a file "
            "in their place), or pass another --data-dir")


def explain(problem: str, args) -> str:
    """A start-up failure, with the next step."""
    if problem.startswith("cannot reach the node"):  # the connection's own advice, made exact here
        problem = problem.removesuffix(": start node.py first, or check the host and port")
        return (f"{problem}: is node.py running there? Start it first (`python3 node.py`), "
                f"or check the host and port ({args.host} {args.port})")
    if "(name_taken)" in problem:  # the node's words already say the name is pinned to another key
        return (f"{problem}: use your original keys (the data directory they were made in, --data-dir) "
                "or another name")
    if problem.startswith("cannot reach the chain at"):
        where = problem.split(": ", 1)[0]  # urllib3's pool details say nothing more to a user
        return (f"{where} (the URL came from {getattr(args, 'rpc_source', 'the default')}): start the chain "
                f"with `python3 main.py chain`, or pass the node's chain with --rpc-url")
    return problem


# --- line mode: stdin is a pipe -------------------------------------------------------

def run_lines(args) -> int:
    def show(line: str, notice: bool) -> None:
        print(line, file=sys.stderr if notice else sys.stdout, flush=True)

    chat = Chat(args.me, args.peer, show)
    client = start_client(args, chat)
    chat.note(f"connected to {args.host}:{args.port} as {args.me}; talking to {args.peer}.")
    try:
        for lines in read_line_batches(sys.stdin.fileno()):
            if client.is_closed:
                raise ClientError("the node closed the connection")
            if not chat.handle_lines(lines):
                break
        wait_at_end(chat, client)
    finally:
        client.close()
    return 1 if chat.not_sent else 0


def wait_at_end(chat: Chat, client) -> None:
    """At end of piped input: until the node has answered every message (at most ACK_WAIT), or
    while it is away, at most AWAY_WAIT for it to come back. Then says what stays queued."""
    deadline, away_since = time.monotonic() + ACK_WAIT, None
    while not client.wait_acknowledged(timeout=0.2) and not client.is_closed:
        now = time.monotonic()
        if client.connection_state != "reconnecting":
            away_since = None
        elif away_since is None:
            away_since = now
            chat.note(f"(end of input: the node is away; waiting up to {AWAY_WAIT:g}s for it to come back, "
                      f"to send {len(client.outstanding)} message(s))")
        elif now - away_since >= AWAY_WAIT:
            break
        if now >= deadline:
            break
    say_what_stays_queued(chat, client, f"the node did not come back within {AWAY_WAIT:g}s"
                          if away_since is not None else None)


def say_what_stays_queued(chat: Chat, client, why_unanswered: str | None = None) -> None:
    """At the end of a session: what stays in the outbox on disk, and that it goes out at the next
    start (the client sends nothing once it has ended)."""
    entries = client.queue()
    waiting = sum(1 for entry in entries if entry.waiting)
    unanswered = len(entries) - waiting
    if unanswered:
        why = why_unanswered or ("the node is away" if client.connection_state == "reconnecting"
                                 else "the node is gone" if client.is_closed else "the node did not answer them")
        chat.note(f"({unanswered} message(s) stay queued on disk ({client.outbox_path}): {why}; they go out "
                  "when you start the client again)")
    if waiting:
        chat.note(f"({waiting} message(s) wait in the queue for offline peers; they go out when you start the "
                  "client again and the peer is online)")


def read_line_batches(fd: int, limit: int = 512):
    """Lines from a pipe, in batches of whatever has arrived (at most `limit`), so that
    a burst is sealed and signed together; a lone line is sent at once."""
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            if pending:
                yield [pending.decode("utf-8", "replace")]
            return
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for start in range(0, len(complete), limit):
            yield [line.decode("utf-8", "replace").rstrip("\r") for line in complete[start:start + limit]]


# --- interactive: prompt_toolkit ------------------------------------------------------

class StartFailed(Exception):
    """Ends the prompt when the client could not start; Chat.start_error says why."""


def history_path(data_dir: Path, me: str) -> Path:
    folder = datadir.client_dir(data_dir, me)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / HISTORY_FILE
    if not path.exists():
        path.touch(mode=0o600)  # what was typed is as private as the messages
    return path


def run_interactive(args) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import HTML
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.patch_stdout import patch_stdout
    from prompt_toolkit.styles import Style

    from dm.client.scroll import Painter, colour_wanted
    from dm.client.toolbar import ChatCompleter, toolbar_text

    def show(line: str, notice: bool) -> None:
        print(line, flush=True)  # through patch_stdout: above the prompt, which is redrawn intact

    chat = Chat(args.me, args.peer, show, Painter(args.me, colour_wanted()))
    data_dir = datadir.resolve(args.data_dir)
    session = PromptSession(history=FileHistory(str(history_path(data_dir, args.me))),
                            completer=ChatCompleter(chat.known), complete_while_typing=False,
                            bottom_toolbar=lambda: HTML("<b>{}</b>").format(toolbar_text(chat.status())),
                            style=Style.from_dict({"bottom-toolbar": "reverse"}),
                            refresh_interval=0.5, erase_when_done=True)
    client_box: list = []

    def starter() -> None:
        try:
            client_box.append(start_client(args, chat))
        except ClientError as exc:
            chat.fail(str(exc))
            return
        except BaseException as exc:  # noqa: BLE001  any surprise is told, not a traceback
            chat.fail(f"the client failed to start: {exc!r}")
            return
        chat.note(f"connected to {args.host}:{args.port} as {args.me}; talking to {chat.peer}. "
                  "/help lists commands, Tab completes, exit quits.")
        chat.refresh_funds_soon()

    async def end_if_start_failed() -> None:
        while not chat._ready.is_set():
            await asyncio.sleep(0.05)
        if chat.start_error is not None:
            session.app.exit(exception=StartFailed())

    def pre_run() -> None:
        if not chat.started:
            session.app.create_background_task(end_if_start_failed())

    threading.Thread(target=starter, name="start", daemon=True).start()
    chat.recall_hint = " (up-arrow brings it back)"
    handler = LineHandler(chat)
    try:
        with patch_stdout(raw=True):
            while chat.start_error is None:
                try:
                    line = session.prompt(chat.prompt, pre_run=pre_run)
                except (EOFError, StartFailed):
                    break
                if is_quit(line):
                    break
                handler.put(line)
            handler.stop()
            if not handler.wait(timeout=0.2):
                chat.note("(quitting once the lines typed before are handled…)")
                handler.wait()
            if chat.start_error is None and client_box:
                finish(chat, client_box[0])
    except KeyboardInterrupt:  # at the prompt or while sending: leave now
        if client_box:
            client_box[0].close()
    if chat.start_error is not None:
        print(f"client: {chat.start_error}", file=sys.stderr)
        return 1
    return 0


class LineHandler:
    """Handles typed lines on a thread of its own, in the order typed, so that the prompt and
    toolbar stay usable while a line waits (for the client to start, for the node, or for the
    chain: `/balance`, or a message that opens a book). Lines typed meanwhile are handled
    together once it is done, as piped lines are. A wait for the chain longer than
    SAY_WAITING_AFTER is told once per batch of lines; it ends within the chain timeout.

    Thread-safety: the prompt thread calls put(), stop() and wait(); `_busy_since` and `_told` are
    written by the handler thread (and `_told` by the watcher), read by the watcher.
    """

    def __init__(self, chat: Chat):
        self.chat = chat
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self._busy_since: float | None = None
        self._told = False
        self._done = threading.Event()
        threading.Thread(target=self._run, name="lines", daemon=True).start()
        threading.Thread(target=self._watch, name="lines-watch", daemon=True).start()

    def put(self, line: str) -> None:
        self._lines.put(line)

    def stop(self) -> None:
        """Handle what was typed so far, then stop."""
        self._lines.put(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Until stopped; False if that takes longer than `timeout`."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        while True:
            lines = [self._lines.get()]
            while not self._lines.empty():
                lines.append(self._lines.get())
            stop = None in lines
            lines = lines[:lines.index(None)] if stop else lines
            self._told, self._busy_since = False, time.monotonic()
            try:
                if lines:
                    self.chat.handle_lines(lines)
            except Exception as exc:  # noqa: BLE001  the next line must still be handled
                self.chat.note(f"error: {exc!r}")
            finally:
                self._busy_since = None
            if stop:
                self._done.set()
                return

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            since = self._busy_since
            if since is None or self._told or time.monotonic() - since < SAY_WAITING_AFTER:
                continue
            if self.chat.chain_waiting() >= SAY_WAITING_AFTER / 2:
                self._told = True
                self.chat.note(f"(waiting for the chain…: keep typing; lines are handled in order once it "
                               f"answers, or fail after {self.chat.chain_timeout:g}s)")


def finish(chat: Chat, client) -> None:
    """Waits a little for the last receipts (not for a node that is away), says what stays
    queued for the next start, then hangs up."""
    try:
        if client.outstanding and client.connection_state == "connected":
            client.wait_acknowledged(timeout=QUIT_WAIT)
        say_what_stays_queued(chat, client)
    finally:
        client.close()

"""The terminal client.

    python3 client.py HOST PORT ME PEER      e.g. python3 client.py localhost 12345 user_1 user_2

On a terminal: prompt_toolkit, with incoming lines printed above the input
(patch_stdout), a bottom toolbar, Tab completion and per-user history. The
prompt appears at once; the client (web3 and all) starts behind it, and lines
typed meanwhile wait for it.

When stdin is not a terminal, lines are read and sent one by one, received
messages go to stdout as `[sender] text`, notices to stderr, and at end of
input the client waits until its messages are acknowledged, then exits.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

from dm import datadir
from dm.client.commands import Chat
from dm.client.errors import ClientError

QUIT_WAIT = 10  # seconds an interactive client waits at exit for its last messages' receipts
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
                            release_timeout=args.release_timeout)
        client.connect()
    except ClientError as exc:
        raise ClientError(explain(str(exc), args)) from None
    except (ChainError, OSError) as exc:
        raise ClientError(explain(f"cannot reach the chain at {args.rpc_url}: {exc}", args)) from None
    chat.attach(client)
    return client


def explain(problem: str, args) -> str:
    """A start-up failure, with the next step."""
    if problem.startswith("cannot reach the node"):
        return (f"{problem}: is node.py running there? Start it first (`python3 node.py`), "
                f"or check the host and port ({args.host} {args.port})")
    if "(name_taken)" in problem:
        return (f"{problem}: the name {args.me} is pinned to another key on this node; use your original keys "
                f"(the data directory they were made in, --data-dir) or another name")
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
        if not client.wait_acknowledged(timeout=120):
            chat.note(f"({len(client.outstanding)} message(s) were never acknowledged by the node)")
        waiting = [entry for entry in client.queue() if entry.waiting]
        if waiting:
            chat.note(f"({len(waiting)} message(s) wait for offline peers; they go out when you start the "
                      "client again)")
    finally:
        client.close()
    return 0


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
    folder = data_dir / "clients" / me
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
    try:
        with patch_stdout(raw=True):
            while chat.start_error is None:
                try:
                    line = session.prompt(chat.prompt, pre_run=pre_run)
                except (EOFError, StartFailed):
                    break
                if not chat.handle_lines([line]):
                    break
            if chat.start_error is None and client_box:
                finish(chat, client_box[0])
    except KeyboardInterrupt:  # at the prompt or while sending: leave now
        if client_box:
            client_box[0].close()
    if chat.start_error is not None:
        print(f"client: {chat.start_error}", file=sys.stderr)
        return 1
    return 0


def finish(chat: Chat, client) -> None:
    """Waits a little for the last receipts, then hangs up."""
    try:
        if client.outstanding and not client.wait_acknowledged(timeout=QUIT_WAIT):
            chat.note(f"({len(client.outstanding)} message(s) were never acknowledged by the node)")
    finally:
        client.close()

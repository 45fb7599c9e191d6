"""The terminal client.

    python3 client.py HOST PORT ME PEER      e.g. python3 client.py localhost 12345 user_1 user_2

Each line typed is encrypted for the current peer, paid for with a bounty
bound to the node, and sent. Incoming messages print as `[sender] text`.
When stdin is not a terminal, lines are read and sent one by one, received
messages go to stdout, and at end of input the client waits until its
messages are acknowledged, then exits.
"""
from __future__ import annotations

import os
import sys
import threading

from dm import datadir
from dm.client.core import ChatClient, ClientError, Events, Incoming

HELP = """commands:
  /to NAME            talk to NAME from now on (or /to #channel)
  /peers              who is online
  /join #name         join (or open) a channel; /to #name then talks to it
  /leave #name        leave a channel: you receive nothing more from it
  /channels           your channels, and every open channel with its member count
  /fingerprint NAME   NAME's key fingerprint, to compare out of band (/fingerprint alone: yours)
  /help               this list
  exit                quit (also /quit or Ctrl-D)"""


class Screen:
    """Prints above the input line on a terminal, so incoming text never lands in half-typed input.

    Thread-safety: the input thread and the client's worker both print; `_lock` keeps their lines whole.
    """

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.prompt = ""
        self._lock = threading.Lock()
        if interactive:
            import readline  # noqa: F401  (line editing and history for input())

    def show(self, line: str, notice: bool = False) -> None:
        with self._lock:
            if self.interactive:
                import readline

                typed = readline.get_line_buffer()
                sys.stdout.write(f"\r\x1b[K{line}\n{self.prompt}{typed}")
                sys.stdout.flush()
            elif notice:
                print(line, file=sys.stderr, flush=True)
            else:
                print(line, flush=True)


def run(args) -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    screen = Screen(interactive)
    state = {"peer": args.peer}

    seen: set[str] = set()  # senders whose key prefix was shown this session (worker thread only)

    def on_message(message: Incoming) -> None:
        if message.genuine:
            if message.sender not in seen:  # once per sender: the key behind the name, to compare
                seen.add(message.sender)    # (a notice: piped stdout keeps exactly `[sender] text`)
                screen.show(f"({message.sender} is key {key_prefix(client.fingerprint(message.sender))}; "
                            f"/fingerprint {message.sender} shows all of it)", notice=True)
            screen.show(message.line())
        else:
            screen.show(f"!! a message claiming to be from {message.sender} FAILED verification and is not shown: "
                        f"{message.problem}", notice=True)

    def on_receipt(msg_id: str, status: str, detail: str) -> None:
        if status == "offline":
            screen.show("(not delivered: the recipient is offline; your bounty stays unspent)", notice=True)
        elif status == "refused":
            screen.show(f"(not delivered: {detail})", notice=True)

    def on_paid(msg_ids: list[str]) -> None:
        if interactive:
            screen.show(f"(node paid for {len(msg_ids)} delivered message(s))", notice=True)

    events = Events(message=on_message, receipt=on_receipt, paid=on_paid,
                    notice=lambda text: screen.show(text, notice=True),
                    closed=lambda reason: screen.show(f"(disconnected: {reason})", notice=True))
    data_dir = datadir.resolve(args.data_dir)
    client = ChatClient(args.host, args.port, args.me, data_dir, rpc_url=args.rpc_url, pay=args.pay,
                        book_size=args.book_size, events=events, release_timeout=args.release_timeout)
    client.connect()
    screen.show(f"connected to {args.host}:{args.port} as {args.me}; talking to {args.peer}."
                + (" /help lists commands, exit quits." if interactive else ""), notice=True)
    try:
        if interactive:
            while True:
                screen.prompt = f"{args.me} -> {state['peer']}> "
                try:
                    line = input(screen.prompt)
                except EOFError:
                    break
                if not handle_lines(client, screen, state, [line]):
                    break
        else:
            for lines in read_line_batches(sys.stdin.fileno()):
                if client.is_closed:
                    raise ClientError("the node closed the connection")
                if not handle_lines(client, screen, state, lines):
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if not client.wait_acknowledged(timeout=120):
            screen.show(f"({len(client.outstanding)} message(s) were never acknowledged by the node)", notice=True)
        client.close()
    return 0


def key_prefix(fingerprint: str) -> str:
    """`SHA256:` and the first four groups of a fingerprint: enough to tell look-alikes apart."""
    return fingerprint[:26] + "…"


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


def handle_lines(client: ChatClient, screen: Screen, state: dict, lines: list[str]) -> bool:
    """Typed or piped lines, in order; consecutive plain lines to one peer go as a batch.
    False means quit."""
    texts: list[str] = []

    def flush() -> None:
        if texts:
            try:
                send(client, screen, state["peer"], texts)
            except ClientError as exc:
                screen.show(f"error: {exc}", notice=True)
            texts.clear()

    for line in lines:
        stripped = line.strip()
        if stripped.startswith("/") or stripped in ("exit", "/exit", "/quit"):
            flush()
            if not handle_command(client, screen, state, stripped):
                return False
        elif line:
            texts.append(line)
    flush()
    return True


def send(client: ChatClient, screen: Screen, peer: str, texts: list[str]) -> None:
    if peer.startswith("#"):
        for text in texts:
            _, offline = client.send_to_channel(peer, text)
            if offline:
                screen.show(f"(offline in {peer}, not sent and not paid: {', '.join(offline)})", notice=True)
    else:
        client.send_many(peer, texts)


def handle_command(client: ChatClient, screen: Screen, state: dict, line: str) -> bool:
    """One command line; False means quit."""
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if line in ("exit", "/exit", "/quit"):
        return False
    try:
        if command == "/help":
            screen.show(HELP, notice=True)
        elif command == "/to":
            if not rest:
                screen.show("usage: /to NAME or /to #channel", notice=True)
            else:
                state["peer"] = check_channel(rest) if rest.startswith("#") else datadir.check_name(rest)
                screen.show(f"(now talking to {rest})", notice=True)
        elif command == "/peers":
            screen.show("online: " + (", ".join(client.peers()) or "nobody"), notice=True)
        elif command == "/fingerprint":
            name = rest or client.me
            screen.show(f"{name}: {client.fingerprint(name)}", notice=True)
        elif command in ("/join", "/leave"):
            channel = check_channel(rest)
            reply = client.join(channel) if command == "/join" else client.leave(channel)
            screen.show(f"({'joined' if command == '/join' else 'left'} {channel}; your channels: "
                        f"{', '.join(reply['joined']) or 'none'})", notice=True)
        elif command == "/channels":
            reply = client.channels()
            listing = ", ".join(f"{c} ({n})" for c, n in reply["all"].items()) or "none"
            screen.show(f"your channels: {', '.join(reply['joined']) or 'none'}; open channels: {listing}",
                        notice=True)
        else:
            screen.show(f"unknown command {command}; /help lists them", notice=True)
    except (ClientError, datadir.DataError) as exc:
        screen.show(f"error: {exc}", notice=True)
    return True


def check_channel(name: str) -> str:
    from dm import wire

    if not wire.is_channel(name):
        raise ClientError(f"invalid channel {name!r}: use '#' and 1-31 letters, digits, '_', '-' or '.'")
    return name

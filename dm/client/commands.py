"""The conversation around one ChatClient: whom we talk to, the commands, and
what is shown for each event. Shared by the interactive terminal and line mode
(stdin a pipe); the terminal only decides where lines go.

Rules a user relies on: commands are case-insensitive; a blank or space-only
line is not sent; `quit` is text, `exit` and `/quit` quit; `//text` sends `/text`.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from dm import datadir
from dm.client.errors import ClientError, Refused
from dm.client.scroll import ACTION_PREFIX, PAID_MARK, Painter, visible
from dm.client.wallet import Wallet, btk, describe

HELP = """commands (case does not matter):
  /to NAME            talk to NAME from now on (or /to #channel)
  /msg NAME text      send one message to NAME (or #channel) without switching
  /me action          an action: others see `* you action`
  /peers              who is online
  /who #chan          who is in one of your channels, online and offline (alone: the current one, or /peers)
  /join #name         join (or open) a channel and talk to it; names are case-insensitive
  /leave #name        leave a channel: you receive nothing more from it
  /channels           your channels, and every open channel with its member count
  /balance            your BTK balance, and what is escrowed in open books until when
  /queue, /drop N     messages waiting for an offline peer; drop number N
  /fingerprint NAME   NAME's key fingerprint, to compare out of band (/fingerprint alone: yours)
  /help               this list
  //text              send a line that starts with /
  exit                quit (also /quit or Ctrl-D); `quit` alone is sent as text"""

COMMANDS = ("/to", "/msg", "/me", "/peers", "/who", "/join", "/leave", "/channels", "/balance", "/queue", "/drop",
            "/fingerprint", "/help", "/quit", "/exit")
QUIT_WORDS = ("exit", "/exit", "/quit")
SENT_REMEMBERED = 10_000  # texts kept to say which message a `paid` was for
CHAIN_SLOW = 1.0  # seconds a chain request may take before the toolbar says the client waits for the chain


def check_channel(name: str) -> str:
    """A channel name as the client uses it: checked, in lower case (channels are case-insensitive)."""
    from dm import wire

    if not wire.is_channel(name):
        raise ClientError(f"invalid channel {name!r}: use '#' and 1-31 letters, digits, '_', '-' or '.'")
    return name.lower()


def check_target(name: str) -> str:
    return check_channel(name) if name.startswith("#") else datadir.check_name(name)


def is_quit(line: str) -> bool:
    return line.strip().lower() in QUIT_WORDS


class Chat:
    """Commands and events for one user's session.

    `show(line, notice)` writes one line where the user sees it; it must be thread-safe.
    Thread-safety: the input thread calls handle_lines(); the client's worker calls the
    event handlers; a start thread calls attach() or fail() once. `_lock` guards `peer`,
    `names`, `channels` and `_sent`; `_ready` publishes the client to the input thread.
    """

    def __init__(self, me: str, peer: str, show: Callable[[str, bool], None], painter: Painter | None = None):
        self.me, self.show, self.painter = me, show, painter
        self._peer = peer
        self.names: set[str] = {peer} if not peer.startswith("#") else set()
        self.channels: set[str] = {peer} if peer.startswith("#") else set()
        self.connection_state = "connecting"
        self.wallet: Wallet | None = None
        self.paid_messages = 0
        self.not_sent = 0  # messages not sent (refused, or not paid for): piped input then exits 1
        self._client = None
        self._start_error: str | None = None
        self._ready = threading.Event()
        self._sent: OrderedDict[str, SentLine] = OrderedDict()  # msg_id -> what it carried, for `paid`
        self._lock = threading.Lock()
        self._refreshing = False
        self._seen: set[str] = set()  # senders whose key prefix was shown (worker thread only)
        self.recall_hint = ""  # after a line that was not sent: how to get it back (the terminal: up-arrow)

    # --- the client, once started -----------------------------------------------------

    def attach(self, client) -> None:
        self._client = client
        self.connection_state = "connected"
        payer = getattr(client, "payer", None)
        if hasattr(payer, "on_open"):
            payer.on_open = self.on_book_opened
        if client.token is not None:
            self.wallet = Wallet(client.token, client.eth_address, client.client_dir / "books")
        self._ready.set()

    def fail(self, error: str) -> None:
        self._start_error = error
        self.connection_state = "closed"
        self._ready.set()

    @property
    def started(self) -> bool:
        return self._ready.is_set() and self._start_error is None

    @property
    def start_error(self) -> str | None:
        return self._start_error

    @property
    def client(self):
        """The ChatClient; waits until it is connected (lines typed meanwhile wait here)."""
        self._ready.wait()
        if self._start_error is not None:
            raise ClientError(self._start_error)
        return self._client

    @property
    def peer(self) -> str:
        with self._lock:
            return self._peer

    def prompt(self) -> str:
        return f"{self.me} -> {self.peer}> "

    def status(self) -> dict:
        """What the toolbar shows."""
        client = self._client
        state = getattr(client, "connection_state", None) if client is not None else None
        if state is None or self.connection_state in ("lost", "reconnecting", "gave_up", "closed", "connecting"):
            state = self.connection_state
        return {"peer": self.peer, "state": state, "funds": self.wallet.funds if self.wallet else None,
                "unacked": len(client.outstanding) if client is not None else 0,
                "chain_waiting": self.chain_waiting() >= CHAIN_SLOW}

    def known(self) -> tuple[list[str], list[str]]:
        """(names, channels) seen this session, for Tab completion."""
        with self._lock:
            return sorted(self.names - {self.me}), sorted(self.channels)

    def learn(self, names=(), channels=()) -> None:
        with self._lock:
            self.names.update(names)
            self.channels.update(channels)

    # --- what the user typed ----------------------------------------------------------

    def handle_lines(self, lines: list[str]) -> bool:
        """Typed or piped lines, in order; consecutive plain lines to one peer go as a batch.
        False means quit."""
        texts: list[str] = []

        def flush() -> None:
            if texts:
                self.send(self.peer, list(texts))
                texts.clear()

        for line in lines:
            stripped = line.strip()
            if not stripped:
                continue  # a blank or space-only line is not worth a paid message
            if stripped.startswith("//"):
                texts.append(line.lstrip()[1:])
            elif stripped.startswith("/") or is_quit(stripped):
                flush()
                if not self.command(stripped):
                    return False
            else:
                texts.append(line)
        flush()
        return True

    def send(self, to: str, texts: list[str]) -> None:
        """Sends and echoes, in order; a failure is shown, never raised, and quotes what was not
        sent. A text too long for one frame is refused alone: the texts around it still go."""
        from dm.client.sending import check_length

        batch: list[str] = []
        for text in texts:
            try:
                check_length(text)
            except ClientError as exc:
                self._send_batch(to, batch)
                batch = []
                self._not_sent([text], str(exc))
            else:
                batch.append(text)
        self._send_batch(to, batch)

    def _send_batch(self, to: str, texts: list[str]) -> None:
        from dm.chain.ethereum import ChainError

        if not texts:
            return
        sent = 0  # a channel's messages go one by one: those before a failure did go
        try:
            client = self.client
            if to.startswith("#"):
                for text in texts:
                    msg_ids, offline = client.send_to_channel(to, text)
                    self._sent_now(msg_ids, to, text)
                    sent += 1
                    if offline:
                        self.note(f"(offline in {to}, not sent and not paid: {', '.join(offline)})")
            else:
                self._sent_now(client.send_many(to, texts), to, *texts)
        except ClientError as exc:
            self._not_sent(texts[sent:], str(exc))
        except (ChainError, OSError) as exc:  # the chain, while paying: requests' errors are OSErrors
            self._not_sent(texts[sent:], f"could not pay for the message: {self.chain_problem(exc)}. Is the "
                                         "chain running? Start it with `python3 main.py chain`")

    def _not_sent(self, texts: list[str], why: str) -> None:
        self.not_sent += len(texts)
        self.note(f"error: {why}; not sent: {quoted(texts)}{self.recall_hint}")

    @property
    def chain_timeout(self) -> float:
        from dm.client.rpc import CHAIN_TIMEOUT

        return getattr(self._client, "chain_timeout", CHAIN_TIMEOUT)

    def chain_problem(self, exc: BaseException) -> str:
        from dm.client.rpc import describe

        return describe(exc, getattr(self._client, "rpc_url", "?"), self.chain_timeout)

    def chain_waiting(self) -> float:
        """Seconds the oldest request to the chain in flight has waited (0: none is)."""
        watch = getattr(self._client, "chain_watch", None)
        return watch.waiting() if watch is not None else 0.0

    def _sent_now(self, msg_ids: list[str], to: str, *texts: str) -> None:
        if not msg_ids:
            return
        with self._lock:
            if len(texts) == len(msg_ids):
                pairs = zip(msg_ids, (SentLine(to, text) for text in texts))
            else:  # a channel message: one id per member copy, all of them one line
                line = SentLine(to, texts[0])
                pairs = ((msg_id, line) for msg_id in msg_ids)
            for msg_id, line in pairs:
                self._sent[msg_id] = line
            while len(self._sent) > SENT_REMEMBERED:
                self._sent.popitem(last=False)
        if self.painter:
            for text in texts:
                self.show(self.painter.message(self.me, text, to if to.startswith("#") else None, to=to), False)

    def command(self, line: str) -> bool:
        """One command line; False means quit."""
        word, _, rest = line.partition(" ")
        command, rest = word.lower(), rest.strip()
        if is_quit(command):
            return False
        try:
            handler = getattr(self, "_cmd_" + command[1:], None) if command in COMMANDS else None
            if handler is None:
                self.note(f"unknown command {word}; /help lists them")
            else:
                handler(rest)
        except (ClientError, datadir.DataError) as exc:
            self.note(f"error: {exc}")
        return True

    def _cmd_help(self, rest: str) -> None:
        for line in HELP.splitlines():  # one note each: a note shows a newline as ^J
            self.note(line)

    def _cmd_to(self, rest: str) -> None:
        if not rest:
            raise ClientError("usage: /to NAME or /to #channel")
        target = check_target(rest)
        if not target.startswith("#"):
            self.client.peer_key(target)  # an unknown name is refused now, not at the next send
        with self._lock:
            self._peer = target
        self.learn(*(((), [target]) if target.startswith("#") else ([target], ())))
        self.note(f"(now talking to {target})")

    def _cmd_msg(self, rest: str) -> None:
        target, _, text = rest.partition(" ")
        if not target or not text.strip():
            raise ClientError("usage: /msg NAME text (or /msg #channel text)")
        target = check_target(target)
        self.learn(*(((), [target]) if target.startswith("#") else ([target], ())))
        self.send(target, [text])

    def _cmd_me(self, rest: str) -> None:
        if not rest:
            raise ClientError("usage: /me action, e.g. /me waves")
        self.send(self.peer, [ACTION_PREFIX + rest])

    def _cmd_peers(self, rest: str) -> None:
        names = self.client.peers()
        self.learn(names)
        self.note("online: " + (", ".join(names) or "nobody"))

    def _cmd_who(self, rest: str) -> None:
        channel = rest or self.peer
        if not channel.startswith("#"):
            return self._cmd_peers("")
        channel = check_channel(channel)
        try:
            reply = self.client.members(channel)
        except Refused as exc:
            if exc.code != "not_a_member":
                raise
            raise ClientError(self._not_in(channel)) from None
        self.learn(reply["online"] + reply["offline"], [channel])
        self.note(f"{channel}: online {', '.join(reply['online']) or 'nobody'}; "
                  f"offline {', '.join(reply['offline']) or 'nobody'}")

    def _not_in(self, channel: str) -> str:
        """Why /who shows nothing for a channel we are not in: it is not open, or not ours."""
        try:
            members = self.client.channels()["all"].get(channel)
        except ClientError:
            members = -1  # cannot tell whether it is open
        if members is None:
            return f"no channel {channel} is open: /join {channel} opens it (/channels lists the open ones)"
        count = f" ({members} member{'s' if members != 1 else ''})" if members > 0 else ""
        return f"you are not in {channel}{count}: /who lists your own channels only; /join {channel} first"

    def _cmd_join(self, rest: str) -> None:
        channel = check_channel(rest)
        reply = self.client.join(channel)
        with self._lock:
            self._peer = channel
        self.learn(channels=[channel, *reply["joined"]])
        self.note(f"(joined {channel}, now talking to it; your channels: {', '.join(reply['joined'])})")

    def _cmd_leave(self, rest: str) -> None:
        if not rest and not self.peer.startswith("#"):
            raise ClientError(f"usage: /leave #channel (you are talking to {self.peer}, not to a channel)")
        channel = check_channel(rest or self.peer)
        reply = self.client.leave(channel)
        self.note(f"(left {channel}; your channels: {', '.join(reply['joined']) or 'none'})")

    def _cmd_channels(self, rest: str) -> None:
        reply = self.client.channels()
        self.learn(channels=[*reply["joined"], *reply["all"]])
        listing = ", ".join(f"{c} ({n})" for c, n in reply["all"].items()) or "none"
        self.note(f"your channels: {', '.join(reply['joined']) or 'none'}; open channels: {listing}")

    def _cmd_fingerprint(self, rest: str) -> None:
        name = datadir.check_name(rest) if rest else self.me
        self.note(f"{name}: {self.client.fingerprint(name)}")

    def _cmd_balance(self, rest: str) -> None:
        self.client  # noqa: B018  (waits for the start)
        if self.wallet is None:
            raise ClientError("no chain connection to read the balance from")
        from dm.chain.ethereum import ChainError

        try:
            funds = self.wallet.refresh()
        except (ChainError, OSError) as exc:
            raise ClientError(f"could not read the chain: {self.chain_problem(exc)}. Is it running? Start it with "
                              "`python3 main.py chain`") from None
        self.note(describe(funds) + (f"; {self.paid_messages} paid this session" if self.paid_messages else ""))

    def _cmd_queue(self, rest: str) -> None:
        client = self.client
        if not hasattr(client, "queue"):
            self.note("(nothing is queued: this client sends at once, and tells you when a peer is offline)")
            return
        waiting = client.queue()
        if not waiting:
            self.note("(no messages waiting)")
        for entry in waiting:
            since = time.strftime("%H:%M", time.localtime(entry.since)) if entry.since else "?"
            self.note(f"  {entry.index}. to {entry.to} since {since}: {entry.text[:60]}")

    def _cmd_drop(self, rest: str) -> None:
        client = self.client
        if not rest.isdigit():
            raise ClientError("usage: /drop N, with N from /queue")
        if not hasattr(client, "drop"):
            self.note("(nothing is queued, so nothing to drop)")
        elif client.drop(int(rest)):
            self.note(f"(dropped message {rest}; its bounty stays unspent)")
        else:
            self.note(f"(no queued message {rest}: /queue lists them)")

    # --- what the node and the client tell us (the client's worker thread) -----------

    def note(self, text: str) -> None:
        """One line of notice. Its control characters are made visible: notices quote the node
        and peers (names, reasons, texts), and none of it may drive the terminal."""
        self.show(self.painter.notice(text) if self.painter else visible(text), True)

    def handlers(self) -> dict[str, Callable]:
        """Event handlers by Events field name; the caller keeps those its Events has."""
        return {"message": self.on_message, "receipt": self.on_receipt, "paid": self.on_paid,
                "notice": self.note, "closed": self.on_closed, "connection": self.on_connection,
                "presence": self.on_presence, "membership": self.on_membership, "queued": self.on_queued}

    def on_message(self, message) -> None:
        if not message.genuine:
            text = (f"!! a message claiming to be from {message.sender} FAILED verification and is not shown: "
                    f"{message.problem}")
            self.show(self.painter.alert(text) if self.painter else visible(text), True)
            return
        self.learn([message.sender], [message.channel] if message.channel else [])
        if message.sender not in self._seen:  # once per sender: the key behind the name, to compare
            self._seen.add(message.sender)
            # A message waiting for us (an offline peer's outbox) can arrive as connect() returns,
            # before attach(): wait for it rather than lose the message.
            self._ready.wait(timeout=30)
            if self._client is not None:
                self.note(f"({message.sender} is key {key_prefix(self._client.fingerprint(message.sender))}; "
                          f"/fingerprint {message.sender} shows all of it)")
        if self.painter:
            self.show(self.painter.message(message.sender, message.text, message.channel), False)
        else:  # piped stdout keeps exactly `[sender] text`
            self.show(message.line(), False)

    def on_receipt(self, msg_id: str, status: str, detail: str) -> None:
        with self._lock:
            to = self._sent[msg_id].to if msg_id in self._sent else "the recipient"
        if status == "offline":
            self.note(f"(not delivered: {to} is offline; your bounty stays unspent)")
        elif status == "refused":
            self.not_sent += 1
            self.note(f"(not delivered to {to}: {detail})")

    def on_paid(self, msg_ids: list[str]) -> None:
        self.paid_messages += len(msg_ids)
        if self.painter is None:
            return
        with self._lock:  # a channel line's copies are one line: quoted once
            lines = dict.fromkeys(self._sent.pop(msg_id) for msg_id in msg_ids if msg_id in self._sent)
        texts = [line.text for line in lines]
        self.note(f"{PAID_MARK} paid {btk(len(msg_ids))} for {quoted(texts) or 'your message'}")
        self.refresh_funds_soon()

    def on_book_opened(self, size: int, expiry: int) -> None:
        today = time.localtime().tm_yday == time.localtime(expiry).tm_yday
        until = time.strftime("%H:%M" if today else "%H:%M on %d %b", time.localtime(expiry))
        self.note(f"(opened a book of {size} codes: {btk(size)} escrowed until {until}; 1 BTK per delivery)")
        self.refresh_funds_soon()

    def on_closed(self, reason: str) -> None:
        gave_up, self.connection_state = self.connection_state == "gave_up", "closed"
        if gave_up:
            return  # on_connection said it, and what to do
        if getattr(self._client, "final_code", None) == "name_in_use":
            self.note(f"(disconnected: {reason}. Your name is now logged in elsewhere, and the node keeps that "
                      "session: lines typed here are not sent. Quit with exit; starting client.py here again "
                      "ends the other session)")
        else:
            self.note(f"(disconnected: {reason}. Lines typed now are not sent: quit with exit, and start client.py "
                      "again once the node is back)")

    def on_connection(self, state: str, detail: str = "") -> None:
        self.connection_state = state
        if state == "gave_up":  # the client is closed for good: detail says why, and what stays queued
            self.note(f"(disconnected: {detail}. Lines typed now are not sent: quit with exit)")
            return
        text = {"lost": "connection to the node lost; reconnecting…", "reconnecting": "reconnecting…",
                "reconnected": "reconnected"}.get(state, state)
        self.note(f"({text}{': ' + detail if detail else ''})")
        if state == "reconnected":
            self.connection_state = "connected"

    def on_presence(self, name: str, online: bool) -> None:
        self.learn([name])
        self.note(f"({name} is {'online' if online else 'offline'})")

    def on_membership(self, channel: str, name: str, joined: bool) -> None:
        self.learn([name], [channel])
        self.note(f"({name} {'joined' if joined else 'left'} {channel})")

    def on_queued(self, msg_id: str, peer: str) -> None:
        self.note(f"({peer} is offline: will deliver when {peer} connects; /queue lists waiting messages)")

    def refresh_funds_soon(self) -> None:
        """Re-reads balance and escrow on a thread of its own; one at a time."""
        if self.wallet is None:
            return
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True

        def refresh():
            try:
                self.wallet.refresh()
            except Exception:  # noqa: BLE001  the toolbar keeps the last figures; /balance says why
                pass
            finally:
                with self._lock:
                    self._refreshing = False

        threading.Thread(target=refresh, name="wallet", daemon=True).start()


@dataclass(eq=False)
class SentLine:
    """One line the user sent, as `paid` quotes it. A channel line's copies share one (compared by
    identity: two lines of the same text are two lines)."""
    to: str
    text: str


def key_prefix(fingerprint: str) -> str:
    """`SHA256:` and the first four groups of a fingerprint: enough to tell look-alikes apart."""
    return fingerprint[:26] + "…"


def quoted(texts: list[str], shown: int = 3) -> str:
    """“first line”, “second” and 2 more: the texts a notice is about, each cut at 30 characters."""
    texts = ["* " + t[len(ACTION_PREFIX):] if t.startswith(ACTION_PREFIX) else t for t in texts]
    listed = ", ".join(f"“{t[:30]}{'…' if len(t) > 30 else ''}”" for t in texts[:shown])
    return listed + (f" and {len(texts) - shown} more" if len(texts) > shown else "")


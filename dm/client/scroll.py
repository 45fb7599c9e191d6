"""How lines look in the interactive client's scroll: a timestamp, a colour per
sender, notices dimmed. NO_COLOR (https://no-color.org) or TERM=dumb turns colour off.

Text from others (a peer's message, names, the node's words) never reaches the terminal
as it is: visible() shows its control characters instead of letting the terminal obey
them, and text_lines() splits a message at its newlines, so that each of its lines is
shown under its sender's name.

Pure functions of their arguments (the clock and the colour switch are passed in).
"""
from __future__ import annotations

import os
import re
import time
import unicodedata
import zlib

_RESET, _DIM, _BOLD = "\x1b[0m", "\x1b[2m", "\x1b[1m"
# Readable on dark and light backgrounds alike; one is picked per sender by a stable hash.
_SENDER_COLOURS = ("\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[34m", "\x1b[35m", "\x1b[36m")
ACTION_PREFIX = "/me "  # a `/me waves` is sent as this text; shown as `* alice waves`
PAID_MARK = "✓"


# Bidi embeddings, overrides and isolates: they reorder what follows on screen (CVE-2021-42574).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NEWLINES = re.compile(r"\r\n|\n")


def _shown_as(char: str) -> str:
    code = ord(char)
    if code < 0x20 or code == 0x7f:
        return "^" + chr(code ^ 0x40)  # caret notation, as `cat -v` shows it: ESC is ^[, CR is ^M
    return f"<U+{code:04X}>"


def visible(text: str) -> str:
    """`text` with every control character (Unicode category Cc: C0, DEL, C1, newlines too) and
    every bidi control shown as a visible mark (`^[`, `^M`, `<U+202E>`), so that a peer can
    neither drive the terminal (title, clearing, cursor moves) nor forge or reorder a line."""
    if text.isprintable():  # the common case; it is False for every character replaced below
        return text
    return "".join(_shown_as(c) if c in _BIDI_CONTROLS or unicodedata.category(c) == "Cc" else c for c in text)


def text_lines(text: str) -> list[str]:
    """A message's lines (split at each LF or CR LF), each made visible(): how a multi-line
    message is shown, every line under its sender's name."""
    return [visible(line) for line in _NEWLINES.split(text)]


def colour_wanted(environ=os.environ) -> bool:
    return not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


class Painter:
    """Formats scroll lines. Immutable once made; any thread may use it."""

    def __init__(self, me: str, colour: bool, clock=time.time):
        self.me, self.colour, self.clock = me, colour, clock

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colour else text

    def stamp(self) -> str:
        return self._paint(_DIM, time.strftime("%H:%M", time.localtime(self.clock())))

    def sender(self, name: str) -> str:
        code = _BOLD if name == self.me else _SENDER_COLOURS[zlib.crc32(name.encode()) % len(_SENDER_COLOURS)]
        return self._paint(code, name)

    def message(self, sender: str, text: str, channel: str | None = None, to: str | None = None) -> str:
        """`12:03 [alice] text`, `12:03 [#dev alice] text`, `12:03 [me → bob] text`, `12:03 * alice waves`.
        A text of several lines gives one scroll line each: the later ones carry the sender too,
        with the time left blank, so that nobody's text can stand on a line of its own."""
        sender, channel, to = visible(sender), channel and visible(channel), to and visible(to)
        where = f"{channel} " if channel else ""
        stamp = self.stamp()
        if text.startswith(ACTION_PREFIX):
            first, *more = text_lines(text[len(ACTION_PREFIX):])
            head = f"* {where}{self.sender(sender)}"
        else:
            first, *more = text_lines(text)
            head = f"[{where}{self.sender(sender)}{' → ' + to if to and not channel else ''}]"
        blank = " " * len("00:00")  # under the stamp
        return "\n".join([f"{stamp} {head} {first}", *(f"{blank} {head} {line}" for line in more)])

    def notice(self, text: str) -> str:
        return f"{self.stamp()} {self._paint(_DIM, visible(text))}"

    def alert(self, text: str) -> str:
        return f"{self.stamp()} {self._paint(_BOLD + _SENDER_COLOURS[0], visible(text))}"

"""How lines look in the interactive client's scroll: a timestamp, a colour per
sender, notices dimmed. NO_COLOR (https://no-color.org) or TERM=dumb turns colour off.

Pure functions of their arguments (the clock and the colour switch are passed in).
"""
from __future__ import annotations

import os
import time
import zlib

_RESET, _DIM, _BOLD = "\x1b[0m", "\x1b[2m", "\x1b[1m"
# Readable on dark and light backgrounds alike; one is picked per sender by a stable hash.
_SENDER_COLOURS = ("\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[34m", "\x1b[35m", "\x1b[36m")
ACTION_PREFIX = "/me "  # a `/me waves` is sent as this text; shown as `* alice waves`
PAID_MARK = "✓"


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
        """`12:03 [alice] text`, `12:03 [#dev alice] text`, `12:03 [me → bob] text`, `12:03 * alice waves`."""
        where = f"{channel} " if channel else ""
        if text.startswith(ACTION_PREFIX):
            return f"{self.stamp()} * {where}{self.sender(sender)} {text[len(ACTION_PREFIX):]}"
        arrow = f" → {to}" if to and not channel else ""
        return f"{self.stamp()} [{where}{self.sender(sender)}{arrow}] {text}"

    def notice(self, text: str) -> str:
        return f"{self.stamp()} {self._paint(_DIM, text)}"

    def alert(self, text: str) -> str:
        return f"{self.stamp()} {self._paint(_BOLD + _SENDER_COLOURS[0], text)}"

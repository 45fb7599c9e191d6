"""The interactive client's bottom toolbar and Tab completion.

Both read the Chat's state when prompt_toolkit asks (on every redraw or key), so
they own nothing.
"""
from __future__ import annotations

from prompt_toolkit.completion import Completer, Completion

from dm.client.commands import COMMANDS
from dm.client.wallet import btk

# Commands whose first argument is a name or a channel.
_TAKES_TARGET = {"/to", "/msg", "/who", "/join", "/leave", "/fingerprint"}
_STATE_SHOWN = {"connected": "connected", "connecting": "connecting…", "lost": "connection lost",
                "reconnecting": "reconnecting…", "gave_up": "disconnected", "closed": "disconnected"}


def toolbar_text(status: dict) -> str:
    """` user_2 │ connected │ 9,900 BTK + 100 escrowed │ 0 unacknowledged │ Tab completes, /help `"""
    funds = status["funds"]
    money = f"{btk(funds.balance)} + {funds.escrowed:,} escrowed" if funds else "balance …"
    parts = [f"to {status['peer']}", _STATE_SHOWN.get(status["state"], status["state"]), money,
             f"{status['unacked']} unacknowledged", "Tab completes, /help"]
    if status.get("chain_waiting"):
        parts.insert(2, "waiting for the chain…")
    return " " + " │ ".join(parts) + " "


class ChatCompleter(Completer):
    """Commands at the start of a line; names and channels after a command that takes one,
    and channels (`#…`) anywhere."""

    def __init__(self, known):
        self.known = known  # () -> (names, channels)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        word = document.get_word_before_cursor(WORD=True)
        if " " not in text.lstrip() and text.lstrip().startswith("/"):
            for command in COMMANDS:
                if command.startswith(word.lower()):
                    yield Completion(command + " ", start_position=-len(word), display=command)
            return
        names, channels = self.known()
        first = text.lstrip().split(" ", 1)[0].lower()
        after_command = first in _TAKES_TARGET and text.count(" ") == 1
        candidates = channels if word.startswith("#") else (names + channels if after_command else [])
        for candidate in candidates:
            if candidate.lower().startswith(word.lower()) and candidate != word:
                yield Completion(candidate + (" " if after_command else ""), start_position=-len(word),
                                 display=candidate)

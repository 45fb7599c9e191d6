"""Error codes and the one exception every refusal travels in.

Each code carries the text a user sees when no better one is given. After a
fatal error the connection is closed: a length-prefixed stream cannot be
resynchronised.
"""
from __future__ import annotations

from .limits import MAX_FRAME

# Error codes, each with the text a user sees when no better one is given.
ERRORS = {
    "bad_frame": "the frame is not a JSON object with a string 'type'",
    "frame_too_large": f"frames are limited to {MAX_FRAME} bytes",
    "unknown_type": "unknown message type",
    "bad_field": "a field is missing or has the wrong type",
    "out_of_order": "that message is not allowed at this point of the session",
    "auth_failed": "the signature does not prove the key for that name",
    "name_taken": "that name is pinned to another key on this node",
    "name_in_use": "that name is already connected",
    "invalid_name": "names are 1-32 ASCII letters, digits, '_', '-' or '.', not starting with '.'",
    "name_confusable": "that name looks like a name already pinned on this node: choose a clearly different name",
    "weak_key": ("this node accepts only RSA keys of 2048 to 4096 bits with public exponent 65537: "
                 "make new keys with `python3 main.py Y NAME`"),
    "unknown_peer": "no such user is known to this node",
    "offline": "the recipient is not connected",
    "unpaid": "the message carries no open bounty bound to this node",
    "bad_code": "that code does not match the message's bounty",
    "unknown_message": "no pending message with that id",
    "expired": "the message's bounty runs out before the node could be paid for it: ask its sender to send it again",
    "bad_channel": "channel names are '#' and 1-31 letters, digits, '_', '-' or '.'",
    "not_a_member": "join the channel first (or the recipient is not in it)",
    "watch_limit": "you watch as many names as this node allows: unwatch some first",
    "unclaimed_limit": "too many delivered messages wait for their codes: send again once codes come back",
    "limit_reached": "a per-user limit of this node was reached",
    "timeout": "the connection was idle or too slow",
    "busy": "the node has too many connections",
    "internal": "the node failed to handle the message",
    "unavailable": "the network of nodes did not answer: try again in a moment",
}


class ProtocolError(Exception):
    """Anything malformed or refused. `code` is one of ERRORS; `fatal` means
    the connection cannot go on (the stream is no longer in sync)."""

    def __init__(self, code: str, message: str | None = None, *, ref: str | None = None, fatal: bool = False):
        self.code = code
        self.message = message or ERRORS.get(code, code)
        self.ref = ref
        self.fatal = fatal
        self.req: int | None = None  # the request id it answers, set by whoever knows it
        super().__init__(f"{code}: {self.message}")

    def to_message(self) -> dict:
        msg = {"type": "error", "code": self.code, "message": self.message}
        if self.ref is not None:
            msg["ref"] = self.ref
        return msg



def error(code: str, message: str | None = None, ref: str | None = None) -> dict:
    return ProtocolError(code, message, ref=ref).to_message()


"""The wire protocol, sans-IO: frames, message shapes, order rules, errors.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON: one object with a string `type`. Bytes go in, messages come out; no
sockets and no threads here. docs/PROTOCOL.md describes every message.
"""
from __future__ import annotations

import json
import re
import struct

MAX_FRAME = 8 * 1024 * 1024  # the same cap for every frame, both directions
MAX_MSG_ID = 64
# json.loads recurses per nesting level, and web3's imports raise the recursion
# limit to 100000, so deep nesting would overflow a thread's C stack. Real
# frames have a handful of containers; refuse absurd counts before parsing.
MAX_CONTAINERS = 1000
_HEX32 = re.compile(r"(0x)?[0-9a-fA-F]{64}")
HEADER = struct.Struct(">I")

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
    "invalid_name": "names are 1-32 letters, digits, '_', '-' or '.'",
    "unknown_peer": "no such user is known to this node",
    "offline": "the recipient is not connected",
    "unpaid": "the message carries no open bounty bound to this node",
    "bad_code": "that code does not match the message's bounty",
    "unknown_message": "no pending message with that id",
    "bad_channel": "channel names are '#' and 1-31 letters, digits, '_', '-' or '.'",
    "not_a_member": "join the channel first (or the recipient is not in it)",
    "timeout": "the connection was idle or too slow",
    "busy": "the node has too many connections",
    "internal": "the node failed to handle the message",
}


class ProtocolError(Exception):
    """Anything malformed or refused. `code` is one of ERRORS; `fatal` means
    the connection cannot go on (the stream is no longer in sync)."""

    def __init__(self, code: str, message: str | None = None, *, ref: str | None = None, fatal: bool = False):
        self.code = code
        self.message = message or ERRORS.get(code, code)
        self.ref = ref
        self.fatal = fatal
        super().__init__(f"{code}: {self.message}")

    def to_message(self) -> dict:
        msg = {"type": "error", "code": self.code, "message": self.message}
        if self.ref is not None:
            msg["ref"] = self.ref
        return msg


def encode(message: dict) -> bytes:
    """One frame for one message."""
    return frame(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode())


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError("frame_too_large", f"a {len(payload)}-byte frame exceeds the {MAX_FRAME}-byte cap")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Accepts bytes in any split and returns whole frame payloads.

    The length is checked against the cap as soon as the 4 header bytes are
    in, before any body is buffered. After an error the decoder stays broken:
    a length-prefixed stream cannot be resynchronised.
    """

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._need: int | None = None  # body length of the frame being read
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def mid_frame(self) -> bool:
        return bool(self._buffer) or self._need is not None

    def feed(self, data: bytes) -> list[bytes]:
        if self._error:
            raise self._error
        need = self._need
        buffer = self._buffer
        if buffer:
            buffer += data
            if need is not None and len(buffer) < need:  # still inside one frame's body: no copy
                return []
            data = bytes(buffer)
            buffer.clear()
        # Frames are sliced straight out of `data`: one copy per frame.
        frames = []
        pos = 0
        end = len(data)
        while True:
            if need is None:
                if end - pos < 4:
                    break
                (need,) = HEADER.unpack_from(data, pos)
                pos += 4
                if need > self.max_frame:
                    self._error = ProtocolError(
                        "frame_too_large", f"a {need}-byte frame exceeds the {self.max_frame}-byte cap", fatal=True)
                    self._need = None
                    raise self._error
            if end - pos < need:
                break
            frames.append(data[pos:pos + need])
            pos += need
            need = None
        if pos < end:
            buffer += memoryview(data)[pos:]
        self._need = need
        return frames


def parse(payload: bytes) -> dict:
    """A frame payload as a message: a JSON object with a string `type`."""
    if payload.count(b"[") + payload.count(b"{") > MAX_CONTAINERS:
        raise ProtocolError("bad_frame", f"the frame nests more than {MAX_CONTAINERS} JSON containers")
    try:
        message = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ProtocolError("bad_frame", "the frame is not valid UTF-8 JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_frame")
    if (b"\\ud" in payload or b"\\uD" in payload) and _has_lone_surrogate(message):
        raise ProtocolError("bad_frame", "the frame has a lone UTF-16 surrogate, which is not text")
    return message


def _has_lone_surrogate(message: dict) -> bool:
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class MessageDecoder(FrameDecoder):
    """A FrameDecoder that also parses each frame (a client's view)."""

    def feed_messages(self, data: bytes) -> list[dict]:
        return [parse(payload) for payload in self.feed(data)]


# ---------------------------------------------------------------------------
# Message shapes. Each field: a type (or tuple of types), and whether required.
# ---------------------------------------------------------------------------

_BOUNTY = dict  # {"code_hash": hex} or {"book": root hex, "index": int}; checked by check_bounty

CLIENT_MESSAGES = {
    "hello": {"name": str, "public_key": str, "eth_address": str},
    "auth": {"signature": str},
    "send": {"to": str, "msg_id": str, "bounty": _BOUNTY, "envelope": dict},
    "claim": {"msg_id": str, "code": str},
    "book": {"root": str, "leaves": list},
    "peers": {},
    "lookup": {"name": str},
    "join": {"channel": str},
    "leave": {"channel": str},
    "channels": {},
    "members": {"channel": str},
    "ping": {},
}

NODE_MESSAGES = {
    "challenge": {"nonce": str, "node_id": str},
    "welcome": {"name": str, "node_eth_address": str, "chain_id": int, "contract": str},
    "deliver": {"from": str, "msg_id": str, "bounty": _BOUNTY, "envelope": dict},
    "receipt": {"msg_id": str, "status": str},
    "paid": {"msg_ids": list},
    "peers": {"names": list},
    "lookup": {"name": str, "public_key": str, "eth_address": str},
    "channels": {"joined": list, "all": dict},
    "members": {"channel": str, "online": list, "offline": list},
    "book": {"root": str, "size": int},
    "error": {"code": str, "message": str},
    "pong": {},
}

# The order rules, all in one place: what a client may send in each phase.
PHASES = {
    "connected": {"hello", "ping"},
    "challenged": {"auth", "ping"},
    "ready": set(CLIENT_MESSAGES) - {"hello", "auth"},
}


def check_fields(message: dict, schemas: dict) -> dict:
    kind = message["type"]
    schema = schemas.get(kind)
    if schema is None:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}")
    for field, expected in schema.items():
        value = message.get(field)
        # bool is an int in Python; never accept it where a number is meant.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ProtocolError("bad_field", f"{kind}.{field} must be {_type_name(expected)}",
                                ref=_ref(message))
    return message


def check_client_message(message: dict, phase: str) -> dict:
    """Validate a client's message for the session phase; raises ProtocolError."""
    check_fields(message, CLIENT_MESSAGES)
    if message["type"] not in PHASES[phase]:
        raise ProtocolError("out_of_order", f"{message['type']!r} is not allowed now"
                            + (": authenticate first" if phase != "ready" else ""))
    if "msg_id" in CLIENT_MESSAGES[message["type"]] and not 0 < len(message["msg_id"]) <= MAX_MSG_ID:
        raise ProtocolError("bad_field", f"msg_id must be 1-{MAX_MSG_ID} characters")
    if message["type"] == "send":
        check_bounty(message["bounty"], ref=message["msg_id"])
        if "channel" in message and not is_channel(message["channel"]):
            raise ProtocolError("bad_field", "send.channel must be a channel name like #general",
                                ref=message["msg_id"])
    if "channel" in CLIENT_MESSAGES[message["type"]] and not is_channel(message["channel"]):
        raise ProtocolError("bad_channel", ref=message["channel"][:64])
    return message


def check_bounty(bounty: dict, ref: str | None = None) -> dict:
    if isinstance(bounty.get("code_hash"), str) and is_hex32(bounty["code_hash"]):
        return bounty
    index = bounty.get("index")
    if (isinstance(bounty.get("book"), str) and is_hex32(bounty["book"]) and isinstance(index, int)
            and not isinstance(index, bool) and 0 <= index < 2**32):
        return bounty
    raise ProtocolError("bad_field", "bounty must be {code_hash} or {book, index}", ref=ref)


_CHANNEL = re.compile(r"#[A-Za-z0-9_.-]{1,31}")


def is_channel(name) -> bool:
    return isinstance(name, str) and _CHANNEL.fullmatch(name) is not None


def is_hex32(text: str) -> bool:
    return _HEX32.fullmatch(text) is not None


def _ref(message: dict) -> str | None:
    ref = message.get("msg_id")
    return ref if isinstance(ref, str) else None


def _type_name(expected) -> str:
    return {str: "a string", int: "an integer", dict: "an object", list: "a list"}.get(expected, str(expected))


def error(code: str, message: str | None = None, ref: str | None = None) -> dict:
    return ProtocolError(code, message, ref=ref).to_message()


def auth_payload(nonce: str, node_id: str, name: str, public_key: str, eth_address: str) -> bytes:
    """What a client signs to prove its name: every field length-prefixed, so
    no two different sessions can produce the same bytes."""
    parts = [nonce, node_id, name, public_key, eth_address]
    return b"dm-auth-v1" + b"".join(HEADER.pack(len(p.encode())) + p.encode() for p in parts)

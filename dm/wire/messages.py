"""Message shapes and the order rules, all in one place: which fields each
message has, and what a client may send in each phase of its session.
docs/PROTOCOL.md describes every message.
"""
from __future__ import annotations

import re

from .errors import ProtocolError
from .frames import HEADER
from .limits import MAX_MSG_ID

_HEX32 = re.compile(r"(0x)?[0-9a-fA-F]{64}")

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
    "watch": {"names": list},
    "unwatch": {"names": list},
    "ping": {},
}

NODE_MESSAGES = {
    "challenge": {"nonce": str, "node_id": str},
    "welcome": {"name": str, "node_eth_address": str, "chain_id": int, "contract": str},
    "deliver": {"from": str, "msg_id": str, "bounty": _BOUNTY, "envelope": dict},
    "receipt": {"msg_id": str, "status": str},
    "release": {"msg_id": str, "key": str},
    "paid": {"msg_ids": list},
    "peers": {"names": list},
    "lookup": {"name": str, "public_key": str, "eth_address": str},
    "channels": {"joined": list, "all": dict},
    "members": {"channel": str, "online": list, "offline": list},
    "book": {"root": str, "size": int},
    "watch": {"online": list, "offline": list},
    "unwatch": {"names": list},
    "presence": {"name": str, "online": bool},
    "membership": {"channel": str, "name": str, "joined": bool},
    "error": {"code": str, "message": str},
    "pong": {},
}

# Members a message may carry besides its required fields. Anything else is refused, so that a
# relayed message can never smuggle a second `from` or other members past the node.
OPTIONAL_FIELDS = {"send": {"channel": str}, "channels": {"after": str}}
ANY_MESSAGE_OPTIONAL = ("type", "req")  # `req`: a request id, echoed in the reply

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
    """Validate a client's message for the session phase; raises ProtocolError.
    The checks, in order: type known, required fields typed, allowed in this phase,
    no unknown members, msg_id length, then a send's bounty and channel."""
    check_fields(message, CLIENT_MESSAGES)
    kind = message["type"]
    if kind not in PHASES[phase]:
        raise ProtocolError("out_of_order", f"{kind!r} is not allowed now"
                            + (": authenticate first" if phase != "ready" else ""))
    unknown = [m for m in message if m not in CLIENT_MESSAGES[kind] and m not in ANY_MESSAGE_OPTIONAL
               and m not in OPTIONAL_FIELDS.get(kind, ())]
    if unknown:
        raise ProtocolError("bad_field", f"{kind} has unknown member(s): {', '.join(sorted(unknown))[:80]}",
                            ref=_ref(message))
    if "msg_id" in CLIENT_MESSAGES[kind] and not 0 < len(message["msg_id"]) <= MAX_MSG_ID:
        raise ProtocolError("bad_field", f"msg_id must be 1-{MAX_MSG_ID} characters")
    if message["type"] == "send":
        check_bounty(message["bounty"], ref=message["msg_id"])
        check_envelope(message["envelope"], ref=message["msg_id"])
        if "channel" in message and not is_channel(message["channel"]):
            raise ProtocolError("bad_field", "send.channel must be a channel name like #general",
                                ref=message["msg_id"])
    if "channel" in CLIENT_MESSAGES[message["type"]] and not is_channel(message["channel"]):
        raise ProtocolError("bad_channel", ref=message["channel"][:64])
    return message


MAX_REQUEST_ID = 2**53 - 1  # exact in every JSON implementation


def request_id(message: dict) -> int | None:
    """A request's optional `req` id, echoed in its reply (or error) so a client can match them.
    Anything else than an integer 0..2**53-1 is refused."""
    req = message.get("req")
    if req is None:
        return None
    if not isinstance(req, int) or isinstance(req, bool) or not 0 <= req <= MAX_REQUEST_ID:
        raise ProtocolError("bad_field", f"req must be an integer 0..{MAX_REQUEST_ID}")
    return req


def check_bounty(bounty: dict, ref: str | None = None) -> dict:
    """Exactly {code_hash} or {book, index}: nothing else rides along to the recipient."""
    if len(bounty) == 1 and isinstance(bounty.get("code_hash"), str) and is_hex32(bounty["code_hash"]):
        return bounty
    index = bounty.get("index")
    if (len(bounty) == 2 and isinstance(bounty.get("book"), str) and is_hex32(bounty["book"])
            and isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 2**32):
        return bounty
    raise ProtocolError("bad_field", "bounty must be {code_hash} or {book, index}", ref=ref)


# Base64 of exactly 32 bytes in its one canonical spelling (the last digit's two spare bits
# zero), so a code slot or digest carries 32 bytes and not a bit more.
B64_32 = r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]="
_B64_32 = re.compile(B64_32)


def check_envelope(envelope: dict, ref: str | None = None) -> dict:
    """What the node needs of an envelope to relay it (docs/PROTOCOL.md §6.1): a string
    `ciphertext` for its layer, and a code slot and digest of exactly 32 bytes each."""
    for slot in ("code_slot", "digest"):
        value = envelope.get(slot)
        if not isinstance(value, str) or _B64_32.fullmatch(value) is None:
            raise ProtocolError("bad_field", f"envelope.{slot} must be base64 of exactly 32 bytes", ref=ref)
    if not isinstance(envelope.get("ciphertext"), str):
        raise ProtocolError("bad_field", "envelope.ciphertext must be a base64 string", ref=ref)
    return envelope


_CHANNEL = re.compile(r"#[A-Za-z0-9_.-]{1,31}")


def is_channel(name) -> bool:
    return isinstance(name, str) and _CHANNEL.fullmatch(name) is not None


def bounty_key(bounty: dict) -> tuple:
    """What a checked bounty pays with, as the node keys it: ("single", code hash) or
    ("book", root, leaf index), hex in lower case without 0x."""
    if "code_hash" in bounty:
        return ("single", bounty["code_hash"].removeprefix("0x").lower())
    return ("book", bounty["book"].removeprefix("0x").lower(), bounty["index"])


def is_hex32(text: str) -> bool:
    return _HEX32.fullmatch(text) is not None


def _ref(message: dict) -> str | None:
    ref = message.get("msg_id")
    return ref if isinstance(ref, str) else None


def _type_name(expected) -> str:
    return {str: "a string", int: "an integer", dict: "an object", list: "a list", bool: "true or false"}.get(expected, str(expected))



def auth_payload(nonce: str, node_id: str, name: str, public_key: str, eth_address: str) -> bytes:
    """What a client signs to prove its name: every field length-prefixed, so
    no two different sessions can produce the same bytes."""
    parts = [nonce, node_id, name, public_key, eth_address]
    return b"dm-auth-v1" + b"".join(HEADER.pack(len(p.encode())) + p.encode() for p in parts)

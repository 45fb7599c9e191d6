"""A `send`'s header, read two ways, and the `deliver` that relays it.

Both readers produce the same `SendHeader`, and one function (dm.relay.rules.rule_on_send)
rules on it, whichever read it:

- `read_send` is the fast reader. It takes the raw payload and accepts only the canonical
  form that clients write: compact JSON, keys in order (type, to, msg_id, bounty, channel,
  envelope), the envelope's keys in the order dm.crypto.seal writes them, ASCII only and no
  backslash (so no escapes). One regex match covers the whole frame, so a frame it accepts is
  exactly one JSON object with no member twice and nothing after the envelope. Anything else
  returns None, and the general reader takes the frame.
- `send_header` takes a message that dm.wire.parse and check_client_message accepted.

For a frame both accept, `splice_deliver` (fast) and `encode_deliver` (general) give the same
bytes: the canonical form is what json.dumps writes for the parsed message. Both put the
envelope's `ciphertext` under the node's layer through the same `seal` function
(dm.relay.sealing), so the sealed bytes are the same too.
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

from .messages import B64_32, bounty_key

_NAME = rb"[A-Za-z0-9_.-]{1,32}+"
_MSG_ID = rb"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}+"  # printable ASCII without '"' and '\'
_INT = rb"(?:0|[1-9][0-9]{0,18}+)"
# The envelope's binary fields as clients write them: standard base64 (dm.crypto.envelope). A
# string holding anything else (an escape, a control character json.dumps would escape) goes
# the general way, so both readers give the same bytes. (A charset of base64 scans three times
# faster in sre than a negated class with a range.)
_B64_STRING = rb'"[A-Za-z0-9+/=]*+"'
_SLOT = rb'"' + B64_32.encode() + rb'"'  # exactly 32 bytes (dm.wire.check_envelope)
# The canonical send, whole. Possessive quantifiers: no backtracking. Roots in lower case without
# 0x (as clients write them), so the header needs no normalising; other spellings go the general way.
_CANONICAL_SEND = re.compile(
    rb'\{"type":"send","to":"(' + _NAME + rb')","msg_id":"(' + _MSG_ID + rb')",'
    rb'"bounty":\{(?:"book":"([0-9a-f]{64})","index":(0|[1-9][0-9]{0,8}+)|"code_hash":"([0-9a-f]{64})")\}'
    rb'(?:,"channel":"(#[A-Za-z0-9_.-]{1,31}+)")?'
    rb',"envelope":\{"from":"' + _NAME + rb'","to":"' + _NAME + rb'","msg_id":"' + _MSG_ID + rb'","ts":' + _INT
    + rb',"wrapped_key":' + _B64_STRING + rb',"nonce":' + _B64_STRING + rb',"code_slot":' + _SLOT + rb',"digest":' + _SLOT
    + rb',"ciphertext":"[A-Za-z0-9+/]*+={0,2}"'
    + rb',"signature":' + _B64_STRING + rb'(?:,"proof":\[(?:' + _B64_STRING + rb'(?:,' + _B64_STRING + rb')*+)?\],"leaf":' + _INT
    + rb')?\}\}')
SEND_PREFIX = b'{"type":"send",'
_SEND_PREFIX_LENGTH = len(SEND_PREFIX)
_CIPHERTEXT = b'"ciphertext":"'  # in a canonical send, the first one is the envelope's member (no string holds a quote)
_BACKSLASH = 92


class SendHeader(NamedTuple):
    """What the node needs to rule on a send; the envelope stays opaque."""
    to: str
    msg_id: str
    paid_by: tuple  # dm.wire.bounty_key: ("single", hash) or ("book", root, index)
    channel: str | None


def read_send(payload: bytes, plain: bool = False, _match=_CANONICAL_SEND.fullmatch,
              _new=tuple.__new__) -> SendHeader | None:
    """The fast reader: a SendHeader for a canonical send, None for anything else.
    `plain`: the caller has already checked that the payload is ASCII without a backslash
    (the node checks a whole read at once)."""
    found = _match(payload)
    if found is None or not plain and (_BACKSLASH in payload or not payload.isascii()):
        return None
    to, msg_id, root, index, code_hash, channel = found.groups()
    # The index pattern stops below 10**9, inside check_bounty's 2**32.
    paid_by = ("book", root.decode(), int(index)) if root is not None else ("single", code_hash.decode())
    return _new(SendHeader, (to.decode(), msg_id.decode(), paid_by, channel and channel.decode()))


def send_header(message: dict) -> SendHeader:
    """The general reader: the header of a checked `send` message."""
    return SendHeader(message["to"], message["msg_id"], bounty_key(message["bounty"]), message.get("channel"))


def deliver_prefix(sender: str) -> bytes:
    return b'{"type":"deliver","from":' + json.dumps(sender).encode() + b","


def splice_deliver(prefix: bytes, payload: bytes, seal, sender: str, msg_id: str, paid_by: tuple) -> bytes:
    """The deliver payload for a canonical send: the sender's name in place of the type, and
    the ciphertext sealed. `seal(sender, msg_id, paid_by, ciphertext, visible)`
    (dm.relay.sealing.NodeLayer.seal) gets `paid_by` (the bounty and its payer:
    dm.relay.ledger.paying), the ciphertext's base64 bytes and the size of the deliver
    without them, and returns the sealed base64 bytes."""
    start = payload.find(_CIPHERTEXT, _SEND_PREFIX_LENGTH) + len(_CIPHERTEXT)
    end = payload.find(b'"', start)
    sealed = seal(sender, msg_id, paid_by, payload[start:end],
                  len(prefix) + len(payload) - _SEND_PREFIX_LENGTH - end + start)
    return b"".join((prefix, payload[_SEND_PREFIX_LENGTH:start], sealed, payload[end:]))


def encode_deliver(sender: str, message: dict, seal, payer: str) -> bytes:
    """The deliver payload for any checked send, in canonical order, the ciphertext sealed by
    `seal` as in splice_deliver (`payer`: the sender's account, whose bounty pays)."""
    envelope = message["envelope"]
    try:
        ciphertext = envelope["ciphertext"].encode("ascii")
    except UnicodeEncodeError:
        ciphertext = b"!"  # not base64: seal() refuses it, like any other
    deliver = {"type": "deliver", "from": sender, "to": message["to"], "msg_id": message["msg_id"],
               "bounty": message["bounty"]}
    if "channel" in message:
        deliver["channel"] = message["channel"]
    deliver["envelope"] = {**envelope, "ciphertext": ""}
    visible = len(json.dumps(deliver, separators=(",", ":"), ensure_ascii=False).encode())
    sealed = seal(sender, message["msg_id"], bounty_key(message["bounty"]) + (payer,), ciphertext, visible)
    deliver["envelope"]["ciphertext"] = sealed.decode("ascii")
    return json.dumps(deliver, separators=(",", ":"), ensure_ascii=False).encode()

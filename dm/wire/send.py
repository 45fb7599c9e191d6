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

For a frame both accept, `plan_splice` (fast) and `plan_encode` (general) plan the same
`deliver`: the canonical form is what json.dumps writes for the parsed message. The node
rules on the plan's size, and only then `seal_deliver` puts the envelope's `ciphertext` under
the node's layer (dm.relay.sealing), so the sealed bytes are the same too.
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

from .errors import ProtocolError
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


def too_visible(visible: int, max_visible: int, msg_id: str) -> ProtocolError:
    return ProtocolError("bad_field", f"the envelope has {visible} bytes outside its ciphertext; at most "
                         f"{max_visible} may be read before the code is returned (the node's --max-visible): "
                         "use a smaller key, or fewer recipients in one batch", ref=msg_id)


def _sealed_length(raw_length: int) -> int:
    """The base64 length of a ciphertext of `raw_length` bytes under the node's layer (its
    16-byte tag added: dm.relay.sealing)."""
    return (raw_length + 18) // 3 * 4


def plan_splice(prefix: bytes, payload: bytes, max_visible: int, msg_id: str) -> tuple:
    """The deliver for a canonical send, all but its seal: (head, head, ciphertext, tail,
    size of the deliver once sealed). The node rules on the size and seals only a message
    that goes out (seal_deliver), so a refused or undeliverable send costs no seal. Refuses
    (bad_field) a deliver with more than `max_visible` bytes outside the ciphertext: what the
    recipient reads before it pays."""
    start = payload.find(_CIPHERTEXT, _SEND_PREFIX_LENGTH) + len(_CIPHERTEXT)
    end = payload.find(b'"', start)
    visible = len(prefix) + len(payload) - _SEND_PREFIX_LENGTH - end + start
    if visible > max_visible:
        raise too_visible(visible, max_visible, msg_id)
    # the fast reader's pattern: base64 characters, then at most two '=' (a '"' or ':' before a short one)
    raw = (end - start) // 4 * 3 - (payload[end - 1] == 61) - (payload[end - 2] == 61)
    return prefix, payload[_SEND_PREFIX_LENGTH:start], payload[start:end], payload[end:], \
        visible + _sealed_length(raw)


def plan_encode(sender: str, message: dict, max_visible: int) -> tuple:
    """plan_splice for any checked send: the deliver in canonical order (what json.dumps
    writes, so the same bytes as plan_splice's for a frame both readers accept). Raises
    ValueError for text that cannot be UTF-8 (a lone surrogate)."""
    dump = lambda value: json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    envelope = message["envelope"]
    deliver = {"type": "deliver", "from": sender, "to": message["to"], "msg_id": message["msg_id"],
               "bounty": message["bounty"]}
    if "channel" in message:
        deliver["channel"] = message["channel"]
    # The envelope is the last member, written member by member so the ciphertext's place is
    # known whatever the other members hold.
    members = [dump(key) + ":" + ("" if key == "ciphertext" else dump(value)) for key, value in envelope.items()]
    at = list(envelope).index("ciphertext")
    head = (dump(deliver)[:-1] + ',"envelope":{' + ",".join(members[:at + 1]) + '"').encode()
    tail = ('"' + "".join("," + member for member in members[at + 1:]) + "}}").encode()
    try:
        ciphertext = envelope["ciphertext"].encode("ascii")
    except UnicodeEncodeError:
        ciphertext = b"!"  # not base64: the seal refuses it, like any other
    visible = len(head) + len(tail)
    if visible > max_visible:
        raise too_visible(visible, max_visible, message["msg_id"])
    return b"", head, ciphertext, tail, visible + _sealed_length(len(ciphertext) // 4 * 3 - ciphertext[-2:].count(b"="))


def seal_deliver(plan: tuple, seal, sender: str, msg_id: str, paid_by: tuple) -> bytes:
    """The deliver payload of a plan (plan_splice, plan_encode), its ciphertext under the
    node's layer: `seal(sender, msg_id, paid_by, ciphertext)` (dm.relay.sealing.NodeLayer.seal)
    gets `paid_by` (the bounty and its payer: dm.relay.ledger.paying) and the ciphertext's
    base64 bytes, and returns the sealed base64 bytes (or refuses a ciphertext that is not
    strict base64)."""
    return b"".join((plan[0], plan[1], seal(sender, msg_id, paid_by, plan[2]), plan[3]))

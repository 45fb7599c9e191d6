"""The sans-IO wire protocol: framing, parsing, shapes and order rules."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dm import wire
from dm.wire import FrameDecoder, MessageDecoder, ProtocolError
from helpers import OPAQUE_ENVELOPE


def feed_all(decoder, data, step=None):
    out = []
    if step is None:
        return decoder.feed(data)
    for i in range(0, len(data), step):
        out += decoder.feed(data[i:i + step])
    return out


messages = st.dictionaries(st.text(max_size=8), st.one_of(st.text(), st.integers(), st.none()), max_size=4).map(
    lambda d: {**d, "type": "x"})


@given(st.lists(messages, max_size=6), st.integers(min_value=1, max_value=50))
def test_frames_round_trip_in_any_split(msgs, step):
    stream = b"".join(wire.encode(m) for m in msgs)
    decoder = MessageDecoder()
    got = [wire.parse(p) for p in feed_all(decoder, stream, step)]
    assert got == msgs
    assert not decoder.mid_frame


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error_whole_or_bytewise(data):
    """h11's invariant: garbage never escapes as anything but ProtocolError."""
    for step in (None, 1):
        decoder = MessageDecoder(max_frame=1000)
        try:
            for payload in feed_all(decoder, data, step):
                try:
                    wire.parse(payload)
                except ProtocolError:
                    pass
        except ProtocolError as exc:
            assert exc.code == "frame_too_large" and exc.fatal


def test_oversize_length_is_rejected_before_the_body_arrives():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">I", 0xFFFFFFFF))  # a 4 GB header and no body at all
    assert info.value.code == "frame_too_large"
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):  # the decoder stays broken: the stream is out of sync
        decoder.feed(wire.encode({"type": "ping"}))


def test_a_frame_over_max_other_that_is_not_a_send_is_skipped_unbuffered():
    """An 8 MB `book` was buffered whole, then copied twice before it was refused: tens of ms of
    copying that hold the interpreter lock (every other connection waits). Now the decoder
    looks at its first bytes and drops the rest as it comes; the frames around it are kept."""
    big = wire.encode({"type": "book", "root": "00" * 32, "leaves": ["11" * 32] * 124_000})
    stream = wire.encode({"type": "ping"}) + big + wire.encode({"type": "ping", "req": 2})
    decoder = FrameDecoder(max_other=wire.MAX_OTHER_FRAME)
    payloads, most_buffered = [], 0
    for i in range(0, len(stream), 262144):  # the node's reads
        payloads += decoder.feed(stream[i:i + 262144])
        most_buffered = max(most_buffered, decoder.buffered)
    assert most_buffered < 262144 + 64  # one read at most, never the 8 MB body
    assert [wire.parse(p) for p in (payloads[0], payloads[2])] == [{"type": "ping"}, {"type": "ping", "req": 2}]
    skipped = payloads[1]
    assert type(skipped) is wire.Oversized and skipped.length == len(big) - 4 and skipped.startswith(b'{"type":"book"')
    assert not decoder.mid_frame and decoder.cpu == 0.0


@settings(max_examples=200)
@given(st.lists(st.sampled_from([b'{"type":"send","x":"' + b"y" * 40 + b'"}', b'{"type":"book","x":"' + b"y" * 40 + b'"}',
                                 b'{"type":"ping"}', b'{"type":"se"}']), max_size=5),
       st.integers(min_value=1, max_value=70))
def test_skipping_gives_the_same_frames_in_any_split(payloads, step):
    """Over max_other (30 bytes here): a send whole, anything else an Oversized placeholder."""
    stream = b"".join(wire.frame(p) for p in payloads)
    expected = [p if len(p) <= 30 or p.startswith(wire.SEND_TYPE_PREFIX) else p[:len(wire.SEND_TYPE_PREFIX)]
                for p in payloads]
    for split in (None, step, 1):
        decoder = FrameDecoder(max_other=30)
        got = feed_all(decoder, stream, split)
        assert got == expected
        assert [type(p) is wire.Oversized for p in got] == [len(p) > 30 and not p.startswith(wire.SEND_TYPE_PREFIX)
                                                           for p in payloads]
        assert not decoder.mid_frame


def test_assembling_a_big_send_is_billed():
    """A send may be 8 MB; copying it together costs the node milliseconds, which the decoder
    counts (`cpu`) for the node to bill to the sender (dm.relay.budget)."""
    payload = b'{"type":"send",' + b" " * (2 * 1024 * 1024) + b"}"
    decoder = FrameDecoder(max_other=wire.MAX_OTHER_FRAME)
    stream = wire.frame(payload)
    got = feed_all(decoder, stream, 262144)
    assert got == [payload] and decoder.cpu > 0


def test_the_cap_is_exact():
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(struct.pack(">I", 10) + b"x" * 10) == [b"x" * 10]
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">I", 11))
    with pytest.raises(ProtocolError):
        wire.frame(b"x" * (wire.MAX_FRAME + 1))


@pytest.mark.parametrize("payload", [b"", b"[]", b"123", b'{"type": 5}', b"\xff\xfe", b'{"no_type": 1}',
                                     b"[" * 100000])
def test_bad_payloads_raise_bad_frame(payload):
    with pytest.raises(ProtocolError) as info:
        wire.parse(payload)
    assert info.value.code == "bad_frame"


def test_order_rules_require_authentication_first():
    send = {"type": "send", "to": "bob", "msg_id": "m1", "bounty": {"code_hash": "ab" * 32},
            "envelope": OPAQUE_ENVELOPE}
    with pytest.raises(ProtocolError) as info:
        wire.check_client_message(send, "connected")
    assert info.value.code == "out_of_order" and "authenticate first" in info.value.message
    assert wire.check_client_message(send, "ready") is send
    with pytest.raises(ProtocolError) as info:
        wire.check_client_message({"type": "hello", "name": "a", "public_key": "k", "eth_address": "0x"},
                                      "ready")
    assert info.value.code == "out_of_order"


@pytest.mark.parametrize("message,code", [
    ({"type": "teleport"}, "unknown_type"),
    ({"type": "send", "to": "bob", "msg_id": "m", "bounty": {"code_hash": "zz"}, "envelope": {}}, "bad_field"),
    ({"type": "send", "to": "bob", "msg_id": "m", "bounty": {"book": "ab" * 32, "index": True},
      "envelope": {}}, "bad_field"),
    ({"type": "send", "to": "bob", "msg_id": "", "bounty": {"code_hash": "ab" * 32}, "envelope": {}}, "bad_field"),
    ({"type": "send", "to": 7, "msg_id": "m", "bounty": {"code_hash": "ab" * 32}, "envelope": {}}, "bad_field"),
    ({"type": "claim", "msg_id": "m"}, "bad_field"),
])
def test_malformed_messages_get_typed_errors(message, code):
    with pytest.raises(ProtocolError) as info:
        wire.check_client_message(message, "ready")
    assert info.value.code == code
    refusal = info.value.to_message()
    assert refusal["type"] == "error" and refusal["code"] == code and refusal["message"]


def test_every_error_code_is_documented():
    doc = open("docs/PROTOCOL.md").read()
    for code in wire.ERRORS:
        assert f"`{code}`" in doc, code
    for kind in set(wire.CLIENT_MESSAGES) | set(wire.NODE_MESSAGES):
        assert f"`{kind}`" in doc, kind

"""Frames, sans-IO: a 4-byte big-endian length, then that many bytes of UTF-8
JSON, one object with a string `type`. Bytes go in, payloads (or messages)
come out; no sockets and no threads here.
"""
from __future__ import annotations

import json
import struct
import time

from .errors import ProtocolError
from .limits import MAX_CONTAINERS, MAX_FRAME, SEND_TYPE_PREFIX

HEADER = struct.Struct(">I")
_PREFIX = len(SEND_TYPE_PREFIX)


def encode(message: dict) -> bytes:
    """One frame for one message."""
    return frame(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode())


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError("frame_too_large", f"a {len(payload)}-byte frame exceeds the {MAX_FRAME}-byte cap")
    return HEADER.pack(len(payload)) + payload


class Oversized(bytes):
    """What a FrameDecoder gives for a frame over its `max_other` that does not begin with
    SEND_TYPE_PREFIX: the first bytes only. The rest was dropped as it arrived, never buffered:
    copying 8 MB into one buffer holds the interpreter lock for milliseconds at a time."""

    length: int  # the length its header announced


class FrameDecoder:
    """Accepts bytes in any split and returns whole frame payloads.

    The length is checked against the cap as soon as the 4 header bytes are
    in, before any body is buffered. After an error the decoder stays broken:
    a length-prefixed stream cannot be resynchronised.

    With `max_other`, a longer frame must begin with SEND_TYPE_PREFIX: one that does not
    comes out as an Oversized placeholder, in order, and its body is skipped. `cpu` adds up
    the CPU time spent assembling frames over `max_other`, for the node to bill.
    """

    def __init__(self, max_frame: int = MAX_FRAME, max_other: int | None = None):
        self.max_frame = max_frame
        self.max_other = max_frame if max_other is None else max_other
        self._buffer = bytearray()
        self._need: int | None = None  # body length of the frame being read
        self._skip = 0  # bytes of an Oversized frame's body still to drop
        self._error: ProtocolError | None = None
        self.cpu = 0.0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def mid_frame(self) -> bool:
        return bool(self._buffer) or self._need is not None or self._skip > 0

    def feed(self, data: bytes) -> list[bytes]:
        need = self._need
        if need is None or need <= self.max_other:
            return self._feed(data)
        started = time.thread_time()  # a big frame's copies: billed, since they hold the lock
        try:
            return self._feed(data)
        finally:
            self.cpu += time.thread_time() - started

    def _feed(self, data: bytes) -> list[bytes]:
        if self._error:
            raise self._error
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip:]
            self._skip = 0
        need = self._need
        buffer = self._buffer
        max_other = self.max_other
        if buffer:
            buffer += data
            if need is not None and len(buffer) < need and (
                    need <= max_other or len(buffer) < _PREFIX or buffer.startswith(SEND_TYPE_PREFIX)):
                return []  # still inside one frame's body: no copy
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
            if need > max_other:
                if end - pos < _PREFIX:
                    break
                if not data.startswith(SEND_TYPE_PREFIX, pos):
                    skipped = Oversized(data[pos:pos + _PREFIX])
                    skipped.length = need
                    frames.append(skipped)
                    if end - pos < need:  # the rest is dropped as it comes
                        self._skip = need - (end - pos)
                        pos, need = end, None
                        break
                    pos += need
                    need = None
                    continue
            if end - pos < need:
                break
            frames.append(data[pos:pos + need])
            pos += need
            need = None
        if pos < end:
            buffer += memoryview(data)[pos:]
        self._need = need
        return frames


class _DuplicateMember(ValueError):
    pass


def _object_without_duplicates(pairs: list) -> dict:
    # json.loads would keep the last of two equal keys; a message that says two things is refused.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateMember
    return obj


def parse(payload: bytes) -> dict:
    """A frame payload as a message: a JSON object with a string `type`, no member twice."""
    if payload.count(b"[") + payload.count(b"{") > MAX_CONTAINERS:
        raise ProtocolError("bad_frame", f"the frame nests more than {MAX_CONTAINERS} JSON containers")
    try:
        # strict=False: raw control characters inside strings are accepted, as the fast reader
        # (dm.wire.send) accepts them without looking; the node never reads those strings.
        message = json.loads(payload.decode("utf-8"), strict=False, object_pairs_hook=_object_without_duplicates)
    except _DuplicateMember:
        raise ProtocolError("bad_frame", "the frame has a member twice in one object") from None
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

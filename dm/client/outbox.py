"""The outbox: every message sent and not yet acknowledged, on disk under
clients/NAME/outbox.journal (mode 0600), so that neither a dropped connection nor a client
restart loses it. Each entry keeps the exact `send` frame, so a resend carries the same
msg_id and bounty and the node delivers and charges it once.

The file is an append-only journal of length-prefixed records, so that a frame is stored
as it is, without escaping (JSON-quoting each frame cost more than sealing it):
    b"+" len(meta) len(frame) meta frame    a message sent (meta: JSON of msg_id, to, text, channel, since)
    b"-" len(msg_id) msg_id                 the node answered it
(lengths are 4-byte big-endian). The records of a batch go out in one write and one fsync,
before the frames go to the node; answers are written in batches (flush_answered) without
an fsync: one lost in a crash only means a resend, which the node answers with its original
outcome. A record cut short by a crash ends the journal when it is read back. Reading it back
rewrites it with only the live entries (a temporary file, fsynced, then renamed over it);
so do close() and a drop, and it is emptied the same way whenever nothing is left in it.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dm import datadir

ANSWERED_BATCH = 256  # answers written in one go at most this many at a time
_LENGTH = struct.Struct(">I")
_TWO_LENGTHS = struct.Struct(">II")


@dataclass
class Queued:
    """One unacknowledged message. `frame` is the exact `send` frame; `waiting` means the
    recipient was offline at the last try (kept in memory: a restart simply tries again)."""
    msg_id: str
    to: str
    text: str
    frame: bytes
    channel: str | None = None
    since: float = field(default_factory=time.time)  # wall-clock time it was first sent
    waiting: bool = False
    index: int = 0  # its 1-based place in ChatClient.queue(), filled in when listed

    def record(self) -> bytes:
        meta = json.dumps({"msg_id": self.msg_id, "to": self.to, "text": self.text, "channel": self.channel,
                           "since": self.since}, separators=(",", ":")).encode("ascii")  # escapes survive any text
        return b"+" + _TWO_LENGTHS.pack(len(meta), len(self.frame)) + meta + self.frame

    @classmethod
    def from_record(cls, meta: bytes, frame: bytes) -> "Queued":
        fields = json.loads(meta)
        return cls(fields["msg_id"], fields["to"], fields["text"], frame, fields.get("channel"), fields["since"])


class Outbox:
    """msg_id -> Queued, in the order they were sent, mirrored in the journal file.

    Thread-safety: `_lock` guards the entries and the file; any thread may call any method.
    Entries handed out are the outbox's own objects; only the client's worker changes their
    `waiting` flag, under the lock (mark_waiting, take_waiting).
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, Queued] = {}
        self._answered: list[bytes] = []  # "-" records not written yet
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load()
        self._rewrite()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        at = 0
        try:
            while at < len(data):
                kind = data[at:at + 1]
                if kind == b"+":
                    meta_length, frame_length = _TWO_LENGTHS.unpack_from(data, at + 1)
                    start = at + 1 + _TWO_LENGTHS.size
                    end = start + meta_length + frame_length
                    if end > len(data):
                        break  # cut short by a crash
                    entry = Queued.from_record(data[start:start + meta_length], data[start + meta_length:end])
                    self._entries[entry.msg_id] = entry
                elif kind == b"-":
                    (length,) = _LENGTH.unpack_from(data, at + 1)
                    start = at + 1 + _LENGTH.size
                    end = start + length
                    if end > len(data):
                        break
                    self._entries.pop(data[start:end].decode("ascii", "replace"), None)
                else:
                    break  # not a record: nothing after it can be trusted
                at = end
        except (struct.error, ValueError, KeyError, TypeError):
            pass  # a record cut short or damaged ends the journal

    def _rewrite(self) -> None:
        """Replace the journal by the live entries alone, atomically."""
        datadir.replace_private(self.path, b"".join(e.record() for e in self._entries.values()))

    # --- changes --------------------------------------------------------------------------

    def add(self, entries: list[Queued]) -> None:
        """Keep these on disk before their frames go out: one write, one fsync."""
        if not entries:
            return
        data = b"".join(e.record() for e in entries)
        with self._lock:
            os.write(self._fd, data)
            os.fsync(self._fd)
            for entry in entries:
                self._entries[entry.msg_id] = entry

    def remove(self, msg_id: str) -> Queued | None:
        """The node answered it for good (delivered or refused): forget it."""
        with self._lock:
            entry = self._entries.pop(msg_id, None)
            if entry is None:
                return None
            if self._fd < 0:
                pass  # closed: left on disk, and a restart's resend is answered by the node's ledger
            elif self._entries:
                encoded = msg_id.encode("ascii", "replace")
                self._answered.append(b"-" + _LENGTH.pack(len(encoded)) + encoded)
                if len(self._answered) >= ANSWERED_BATCH:
                    self._write_answered()
            else:  # nothing left: start the journal afresh
                self._answered.clear()
                os.close(self._fd)
                self._rewrite()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            return entry

    def flush_answered(self) -> None:
        """Write the answers noted since the last write (the worker calls this when idle)."""
        with self._lock:
            self._write_answered()

    def _write_answered(self) -> None:  # with _lock held
        if self._answered and self._fd >= 0:
            os.write(self._fd, b"".join(self._answered))
        self._answered.clear()

    def mark_waiting(self, msg_id: str) -> Queued | None:
        """The recipient was offline: it waits for them. The entry, if it was not waiting yet."""
        with self._lock:
            entry = self._entries.get(msg_id)
            if entry is None or entry.waiting:
                return None
            entry.waiting = True
            return entry

    def take_waiting(self, name: str | None = None) -> list[Queued]:
        """Entries to send again: those waiting for `name` (None: every entry, after a reconnect),
        marked as no longer waiting."""
        with self._lock:
            chosen = [e for e in self._entries.values() if name is None or (e.waiting and e.to == name)]
            for entry in chosen:
                entry.waiting = False
            return chosen

    # --- reading --------------------------------------------------------------------------

    def get(self, msg_id: str) -> Queued | None:
        return self._entries.get(msg_id)

    def listing(self) -> list[Queued]:
        """Every entry, oldest first, numbered from 1."""
        with self._lock:
            entries = list(self._entries.values())
        for number, entry in enumerate(entries, 1):
            entry.index = number
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def compact(self) -> None:
        """Rewrite the journal with the live entries only (a dropped message's text leaves the disk)."""
        with self._lock:
            self._answered.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._rewrite()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def close(self) -> None:
        with self._lock:
            self._answered.clear()  # the rewrite below holds only the live entries anyway
            if self._fd >= 0:
                os.close(self._fd)
                self._rewrite()
                self._fd = -1

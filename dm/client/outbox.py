"""The outbox: every message sent and not yet acknowledged, on disk under
clients/NAME/outbox.jsonl (mode 0600), so that neither a dropped connection nor a client
restart loses it. Each entry keeps the exact `send` frame, so a resend carries the same
msg_id and bounty and the node delivers and charges it once.

The file is an append-only journal: `{"add": entry}` when messages are sent (one write and
one fsync per batch, before the frames go out), `{"done": msg_id}` when the node answered.
A line cut short by a crash is ignored when the journal is read back. Reading it back
rewrites it with only the live entries (a temporary file, fsynced, then renamed over it);
so do close() and a drop, and it is emptied the same way whenever nothing is left in it.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


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

    def record(self) -> dict:
        return {"msg_id": self.msg_id, "to": self.to, "text": self.text, "channel": self.channel,
                "since": self.since, "frame": self.frame.decode("utf-8", "surrogateescape")}

    @classmethod
    def from_record(cls, record: dict) -> "Queued":
        return cls(record["msg_id"], record["to"], record["text"], record["frame"].encode("utf-8", "surrogateescape"),
                   record.get("channel"), record["since"])


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
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load()
        self._rewrite()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _load(self) -> None:
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return
        for line in lines:
            try:
                record = json.loads(line)
                if "add" in record:
                    entry = Queued.from_record(record["add"])
                    self._entries[entry.msg_id] = entry
                elif "done" in record:
                    self._entries.pop(record["done"], None)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # an empty line, or one a crash cut short

    def _rewrite(self) -> None:
        """Replace the journal by the live entries alone, atomically."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join(_line({"add": e.record()}) for e in self._entries.values()))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    # --- changes --------------------------------------------------------------------------

    def add(self, entries: list[Queued]) -> None:
        """Keep these on disk before their frames go out: one write, one fsync."""
        if not entries:
            return
        data = b"".join(_line({"add": e.record()}) for e in entries)
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
                os.write(self._fd, _line({"done": msg_id}))
            else:  # nothing left: start the journal afresh
                os.close(self._fd)
                self._rewrite()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            return entry

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
            if self._fd >= 0:
                os.close(self._fd)
                self._rewrite()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._rewrite()
                self._fd = -1


def _line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"  # escapes survive any text

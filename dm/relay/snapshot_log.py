"""A small durable store: a JSON snapshot plus an append-only log of changes since it.

Each change is one fsynced line, so a change costs one short write, never a rewrite of
everything. At open, the log is folded into the snapshot and emptied; while open, the owner
compacts it the same way once it holds more lines than the state has entries (and at least
COMPACT_AFTER), so the files stay within a small multiple of the state, at an amortised O(1)
per change. Replaying a change twice changes nothing (every `apply` is idempotent), so a crash
between the new snapshot and the emptied log loses nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from dm import datadir

COMPACT_AFTER = 1000  # log lines before a compaction is considered


class SnapshotLog:
    """`path` holds the snapshot, `path` with .jsonl the changes since.

    Thread-safety: none of its own; its owner serialises append() calls."""

    def __init__(self, path: Path, empty, apply: Callable[[object, dict], None]):
        self.path = path
        self.log_path = path.with_suffix(".jsonl")
        self.state = datadir.read_json(path, empty)
        try:
            for line in self.log_path.read_text().splitlines():
                try:
                    apply(self.state, json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash
        except FileNotFoundError:
            pass
        datadir.write_json(path, self.state)
        self.log_path.unlink(missing_ok=True)
        self._log = open(self.log_path, "a")
        self.lines = 0  # in the log since the snapshot

    def append(self, entry: dict) -> None:
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        self.lines += 1

    def needs_compaction(self, entries: int) -> bool:
        """Whether the log outgrew a state of `entries` entries."""
        return self.lines >= max(COMPACT_AFTER, entries)

    def compact(self, state) -> None:
        """Write `state` (which includes every change logged) as the snapshot, then empty the log."""
        tmp = self.path.with_suffix(".compact.tmp")
        with open(tmp, "w") as handle:  # durable before the log it replaces is emptied
            handle.write(json.dumps(state, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self._log.close()
        self._log = open(self.log_path, "w")
        self.lines = 0

    def close(self) -> None:
        self._log.close()

"""A small durable store: a JSON snapshot plus an append-only log of changes since it.

Each change is one fsynced line, so a change costs one short write, never a rewrite of
everything. At open, the log is folded into the snapshot and emptied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from dm import datadir


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

    def append(self, entry: dict) -> None:
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        self._log.close()

"""Claims waiting for the node's key, on disk: clients/NAME/awaiting.jsonl (mode 0600).

A claimed message is paid for once its code reaches the node; its text opens only with the
key the node releases. Kept in memory alone, a claim was lost with the client: a client that
quit or crashed before the key came had paid for a message it could never read. So each
`deliver` whose code goes back is written here first, and a restarted client claims it again
(the node answers its recipient's repeated claim with the same key, and is paid once).

One JSON object a line:
    {"deliver": {...}, "at": wall-clock seconds}   a message claimed, as the node relayed it
    {"done": msg_id}                               its key came, or the node refused the claim
Lines are written without fsync: a client that crashes loses nothing the OS holds, and only a
power cut can cost a claim made in its last moments. A torn last line is ignored. Reading the
file back rewrites it with the live entries only (a temporary file, then a rename); so does
close().
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from dm import datadir


class AwaitingLog:
    """The claimed delivers still waiting for their key, in the order they were claimed.

    Thread-safety: the client's worker thread makes every change (dm.client.receiving.Receiver's
    rule); `_lock` guards the entries and the file all the same, so that close() from another
    thread never cuts a line in half.
    """

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict] = {}  # msg_id -> {"deliver": ..., "at": ...}
        self._file = None
        self._lock = threading.Lock()

    def load(self) -> list[dict]:
        """The delivers still waiting, oldest first; compacts the file and opens it for appending."""
        with self._lock:
            return self._load()

    def _load(self) -> list[dict]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                record = json.loads(line)
                if "done" in record:
                    self._entries.pop(record["done"], None)
                elif isinstance(record["deliver"], dict) and isinstance(record["deliver"].get("msg_id"), str):
                    self._entries[record["deliver"]["msg_id"]] = record
            except (ValueError, KeyError, TypeError):
                continue  # a torn or damaged line: the others still count
        self._rewrite()
        self._file = open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8")
        return [record["deliver"] for record in self._entries.values()]

    def add(self, deliver: dict) -> None:
        record = {"deliver": deliver, "at": time.time()}
        with self._lock:
            self._entries[deliver["msg_id"]] = record
            self._append(record)

    def done(self, msg_id: str) -> None:
        with self._lock:
            if self._entries.pop(msg_id, None) is not None:
                self._append({"done": msg_id})

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._rewrite()

    def __len__(self) -> int:
        return len(self._entries)

    def _append(self, record: dict) -> None:  # with _lock held
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()  # to the OS: a crash of the client loses nothing written

    def _rewrite(self) -> None:  # with _lock held
        datadir.write_lines(self.path, [json.dumps(record, separators=(",", ":")) for record in self._entries.values()])

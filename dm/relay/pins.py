"""The node's name -> key pins: set at a name's first proof, kept on disk, never replaced."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from dm import datadir


class PinStore:
    """name -> public key, pinned at the first successful proof, kept on disk.

    pins.json holds the pins as of the last start; each new pin is appended to
    pins.jsonl (fsynced) and folded into pins.json at the next start, so adding
    a user costs one short write, not a rewrite of every pin."""

    def __init__(self, path: Path):
        self.path = path
        self.log_path = path.with_suffix(".jsonl")
        self._pins: dict[str, dict] = datadir.read_json(path, {})
        try:
            for line in self.log_path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self._pins[entry["name"]] = {"public_key": entry["public_key"], "eth_address": entry["eth_address"]}
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash
        except FileNotFoundError:
            pass
        datadir.write_json(path, self._pins)
        self.log_path.unlink(missing_ok=True)
        self._log = open(self.log_path, "a")
        self._lock = threading.Lock()

    def get(self, name: str) -> dict | None:
        return self._pins.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._pins

    def __len__(self) -> int:
        return len(self._pins)

    @property
    def names(self):
        return self._pins.keys()

    def pin(self, name: str, public_key: str, eth_address: str) -> str:
        """Pin at first use; returns "new", "same", "moved" (same key, new Ethereum address)
        or "conflict" (another key holds the name)."""
        with self._lock:
            pinned = self._pins.get(name)
            if pinned and pinned["public_key"].strip() != public_key.strip():
                return "conflict"
            outcome = "new" if not pinned else "same" if pinned["eth_address"] == eth_address else "moved"
            if outcome != "same":
                self._pins[name] = {"public_key": public_key, "eth_address": eth_address}
                self._log.write(json.dumps({"name": name, **self._pins[name]}) + "\n")
                self._log.flush()
                os.fsync(self._log.fileno())
            return outcome

    def close(self) -> None:
        self._log.close()

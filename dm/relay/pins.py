"""The node's name -> key pins: set at a name's first proof, kept on disk, never replaced."""
from __future__ import annotations

import threading
from pathlib import Path

from dm.relay.names import skeleton
from dm.relay.snapshot_log import SnapshotLog

# Names pinned in all (node.py --max-pins). A pin costs about 0.8 KB of memory and 0.6 KB of disk
# with an RSA-2048 key, 1.2 KB and 0.9 KB with RSA-4096 (bench/pins.py), and 30-55 µs of start-up:
# 100,000 pins are at most ~115 MB of memory, ~94 MB of disk and 3-5 s to start.
MAX_PINS = 100_000


def _apply(pins: dict, entry: dict) -> None:
    pins[entry["name"]] = {"public_key": entry["public_key"], "eth_address": entry["eth_address"]}


class PinStore:
    """name -> {public_key, eth_address}, pinned at the first successful proof, kept on disk
    (pins.json, and pins.jsonl for the pins added since the last start).

    It also keeps a skeleton index (dm.relay.names.skeleton -> the first name pinned with
    that skeleton), rebuilt at start from the pins, so that a NEW name that looks like a
    pinned one (`aIice` once `alice` is pinned) is refused. Names pinned before the index
    existed keep their pins even if two of them collide; the index names the older one.

    At most `max_pins` names are pinned by proofs made here (pin(capped=True)); past it a new
    name is refused ("full") and pinned names keep theirs. Pins that come from elsewhere (the
    network's, with --cluster) are never refused: the cap applies where a name is first pinned.

    Thread-safety: pin() runs under the store's own lock, which nothing else takes, so its
    fsync holds up no other thread; it checks the cap and updates the pins and the skeleton
    index together, so names pinned at once cannot pass the cap. Readers (get, full,
    confusable_with, `names` on the hot path) take no lock: a dict read sees a pin or an index
    entry or not, and neither is ever replaced or removed."""

    def __init__(self, path: Path, max_pins: int = MAX_PINS):
        self.max_pins = max_pins
        self._store = SnapshotLog(path, {}, _apply)
        self._pins: dict[str, dict] = self._store.state
        self._skeletons: dict[str, str] = {}
        skeleton("")  # builds its tables now (0.1 s of CPU), not inside the first hello
        for name in self._pins:
            self._skeletons.setdefault(skeleton(name), name)
        self._lock = threading.Lock()

    def get(self, name: str) -> dict | None:
        return self._pins.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._pins

    def __len__(self) -> int:
        return len(self._pins)

    @property
    def names(self):
        """A live view, for membership tests without a method call per message."""
        return self._pins.keys()

    @property
    def full(self) -> bool:
        """No room for a new name (a lock-free look: pin(capped=True) decides)."""
        return len(self._pins) >= self.max_pins

    def confusable_with(self, name: str) -> str | None:
        """The pinned name that `name` would be confused with, if `name` is not pinned itself."""
        if name in self._pins:
            return None
        return self._skeletons.get(skeleton(name))

    def pin(self, name: str, public_key: str, eth_address: str, *, capped: bool = False) -> str:
        """Pin at first use; returns "new", "same", "moved" (same key, new Ethereum address),
        "conflict" (another key holds the name), "confusable" (a new name that looks like a
        pinned one; see confusable_with) or, when `capped`, "full" (a new name, and max_pins
        are pinned)."""
        with self._lock:
            pinned = self._pins.get(name)
            if pinned and pinned["public_key"].strip() != public_key.strip():
                return "conflict"
            if not pinned and self.confusable_with(name) is not None:
                return "confusable"
            if not pinned and capped and len(self._pins) >= self.max_pins:
                return "full"
            outcome = "new" if not pinned else "same" if pinned["eth_address"] == eth_address else "moved"
            if outcome != "same":
                entry = {"name": name, "public_key": public_key, "eth_address": eth_address}
                self._store.append(entry)
                _apply(self._pins, entry)
                self._skeletons.setdefault(skeleton(name), name)
            return outcome

    def close(self) -> None:
        self._store.close()

"""Peers' public keys: fetched from the node's directory and pinned on first use
in clients/ME/peers.json. A served key that differs from its pin is refused
loudly, and the pin is never replaced: only the user may remove it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from dm import crypto, datadir
from dm.client.errors import ClientError


class PeerKeys:
    """Thread-safety: `_lock` guards the pins, the keys verified this session and the
    pins file. It is held across a batch of lookups, so that two callers never fetch
    or pin the same name twice.
    """

    def __init__(self, data_dir: Path, pins_path: Path, fetch: Callable[[list[str]], dict[str, str]]):
        """`fetch(names)` returns the PEM key the node serves for each name, or raises ClientError."""
        self.data_dir, self.pins_path, self._fetch = data_dir, pins_path, fetch
        self._pins: dict[str, str] = datadir.read_json(pins_path, {})
        self._verified: dict = {}  # name -> public key, checked against its pin this session
        self._lock = threading.Lock()

    def get(self, names: list[str]) -> dict:
        """The public key of each name. A batch is fetched in one go and the pins file written
        once (a channel's first message may meet 1,000 new names)."""
        with self._lock:
            missing = [n for n in dict.fromkeys(names) if n not in self._verified]
            if missing:
                self._pin(self._fetch(missing))
            return {n: self._verified[n] for n in names}

    def _pin(self, served: dict[str, str]) -> None:
        changed = False
        for name, pem in served.items():
            self._check(name, pem)
            if name not in self._pins:
                self._pins[name] = pem
                changed = True
            self._verified[name] = crypto.public_key_from_pem(pem)
        if changed:
            datadir.write_json(self.pins_path, self._pins)

    def _check(self, name: str, served: str) -> None:
        pinned = self._pins.get(name)
        local = datadir.public_key_path(self.data_dir, name)
        if pinned is None and local.exists():  # the original's shared key files
            pinned = local.read_text()
        if pinned is not None and pinned.strip() != served.strip():
            raise ClientError(
                f"WARNING: the key for {name} has CHANGED (pinned {crypto.fingerprint(pinned)}, node now serves "
                f"{crypto.fingerprint(served)}). Someone may be impersonating {name}. Compare fingerprints "
                f"out of band; if the change is genuine, remove {name} from {self.pins_path}.")

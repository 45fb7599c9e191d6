"""Peers' public keys: fetched from the node's directory and pinned on first use
in clients/ME/peers.json. A served key that differs from its pin is refused
loudly, and the pin is never replaced: only the user may remove it. A key outside
what dm.crypto.check_key_strength accepts (or one the node refuses to serve as weak)
is never used: UnusableKey. While the node cannot be asked (it is away), a pinned key
stands in, so that a message to a known peer is still sealed and queued; it is checked
against the node again at the next lookup once connected.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from dm import crypto, datadir
from dm.client.errors import ClientError, NotConnected


class UnusableKey(ClientError):
    """A peer's key is weak or absurd (or the node says so): nothing is encrypted to it."""


class PeerKeys:
    """Thread-safety: `_lock` guards the pins, the keys verified this session and the
    pins file. It is held across a batch of lookups, so that two callers never fetch
    or pin the same name twice.
    """

    def __init__(self, data_dir: Path, pins_path: Path, fetch: Callable[[list[str]], dict]):
        """`fetch(names)` returns, for each name, the PEM key the node serves or an UnusableKey
        (the node refused it as weak); it raises ClientError for any other failure."""
        self.data_dir, self.pins_path, self._fetch = data_dir, pins_path, fetch
        self._pins: dict[str, str] = datadir.read_json(pins_path, {})
        self._verified: dict = {}  # name -> public key, checked against its pin this session
        self._lock = threading.Lock()

    def get(self, names: list[str]) -> dict:
        """The public key of each name. A batch is fetched in one go and the pins file written
        once (a channel's first message may meet 1,000 new names). Raises UnusableKey for
        the first name whose key is weak, ClientError for a changed key or any other failure."""
        keys, unusable = self.usable(names)
        if unusable:
            raise next(iter(unusable.values()))
        return keys

    def usable(self, names: list[str]) -> tuple[dict, dict[str, UnusableKey]]:
        """Like get(), but a weak key does not fail the batch: (the keys of the names that
        have a usable one, name -> UnusableKey for the others)."""
        with self._lock:
            missing = [n for n in dict.fromkeys(names) if n not in self._verified]
            try:
                unusable = self._pin(self._fetch(missing)) if missing else {}
            except NotConnected:
                return self._pinned_only(names), {}
            return {n: self._verified[n] for n in names if n in self._verified}, unusable

    def _pinned_only(self, names: list[str]) -> dict:
        """The keys while the node is away: verified ones, else the pins on disk (not marked
        verified, so the node is asked again once it is back). NotConnected for a name with no
        pin: there is nothing to seal to."""
        keys = {}
        for name in dict.fromkeys(names):
            if name in self._verified:
                keys[name] = self._verified[name]
                continue
            pem = self._pinned(name)
            if pem is None:
                raise NotConnected(f"the node is away and {name}'s key is not pinned here yet: send to {name} "
                                   "once the client has reconnected")
            try:  # a pin was checked when made; the original's shared key file was not
                crypto.check_key_strength(pem)
            except (crypto.WeakKeyError, crypto.KeyFileError) as exc:
                raise UnusableKey(f"{name}'s key is refused: {exc}; {name} must make new keys "
                                  "(python3 main.py Y NAME)") from None
            keys[name] = crypto.public_key_from_pem(pem)
        return keys

    def _pinned(self, name: str) -> str | None:
        """The key pinned for `name`: in the pins file, else the original's shared key file."""
        pinned = self._pins.get(name)
        local = datadir.public_key_path(self.data_dir, name)
        if pinned is None and local.exists():
            pinned = local.read_text()
        return pinned

    def _pin(self, served: dict) -> dict[str, UnusableKey]:
        changed, unusable = False, {}
        for name, pem in served.items():
            if isinstance(pem, UnusableKey):
                unusable[name] = pem
                continue
            self._check(name, pem)
            try:
                crypto.check_key_strength(pem)
            except (crypto.WeakKeyError, crypto.KeyFileError) as exc:
                unusable[name] = UnusableKey(f"{name}'s key is refused: {exc}; {name} must make new keys "
                                             "(python3 main.py Y NAME)")
                continue
            if name not in self._pins:
                self._pins[name] = pem
                changed = True
            self._verified[name] = crypto.public_key_from_pem(pem)
        if changed:
            datadir.write_json(self.pins_path, self._pins)
        return unusable

    def _check(self, name: str, served: str) -> None:
        pinned = self._pinned(name)
        if pinned is not None and pinned.strip() != served.strip():
            raise ClientError(
                f"WARNING: the key for {name} has CHANGED (pinned {crypto.fingerprint(pinned)}, node now serves "
                f"{crypto.fingerprint(served)}). Someone may be impersonating {name}. Compare fingerprints "
                f"out of band; if the change is genuine, remove {name} from {self.pins_path}.")

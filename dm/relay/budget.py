"""CPU budgets, refusal windows and new-name allowances that outlive a connection.

Work the fast reader does not take (handshakes, `book` hashing, parsing, lookups) is billed
to the peer's address and, once it has proved a name, to that name as well. Closing and
reopening a connection therefore starts from the same debt and the same refusals as before:
a reconnecting client no longer gets a fresh burst allowance or a fresh --max-errors.

    per name     --cpu-share of a core (CPU_BURST at once), and --max-errors / --error-window
    per address  --ip-cpu-share of a core (IP_CPU_BURST at once); an IPv6 address counts by its /64
                 --new-names-per-hour names it may pin or move (as many at once), a token bucket

The address allowance is wide on purpose: every client on one host, behind one NAT, or (in the
tests and benchmarks) on 127.0.0.1 shares it, so it only bounds what a name cannot, an address
that makes new names or floods handshakes. Refusals are not counted per address, since one
client's mistakes must not close its neighbours' connections. Behind a proxy, where every
client has the proxy's address, --ip-cpu-share 0 leaves only the per-name budget, and
--new-names-per-hour 0 only the node's --max-pins.
"""
from __future__ import annotations

import collections
import ipaddress
import threading

CPU_BURST = 0.25  # seconds of CPU a name may spend at once (a 10,000-leaf book is ~0.03 s)
IP_CPU_SHARE = 0.5  # of a core, per address (node.py --ip-cpu-share)
IP_CPU_BURST = 2.5  # seconds at once per address: a few thousand handshakes
# New names pinned per address (node.py --new-names-per-hour), and as many at once: a class or an
# office behind one NAT making its names together. Past them one more an hour / this many.
NEW_NAMES_PER_HOUR = 100
MAX_BUDGETS = 50_000  # names and addresses remembered (node.py --max-budgets): ~270 B each, ~1 KB with refusals


def address_key(host: str) -> str:
    """The budget key of a peer's address: IPv4 as is, IPv6 by its /64 (one host's usual share)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


class _Entry:
    __slots__ = ("budget", "at", "refusals")

    def __init__(self, budget: float, at: float):
        self.budget, self.at = budget, at
        self.refusals: collections.deque[float] | None = None  # made at the first refusal: most never have one


class Budgets:
    """One owner for every address's and name's CPU budget and refusal window.

    Keys are ("ip", address_key(host)), ("user", name) (CPU seconds) and ("names",
    address_key(host)) (new names, or moves to another account, it may still make). At most
    `max_entries` are kept, least recently used dropped first; an entry that has refilled to
    its burst and has no refusal in the window is no different from a new one, and is dropped
    first.

    Thread-safety: every connection thread calls in; the entries and their order are read
    and written only under `_lock`, which is held for a few dict operations per call and
    never around I/O or a pause.
    """

    def __init__(self, *, share: float, ip_share: float = IP_CPU_SHARE, burst: float = CPU_BURST,
                 ip_burst: float = IP_CPU_BURST, max_errors: int = 20, error_window: float = 10.0,
                 max_entries: int = MAX_BUDGETS, new_names_per_hour: int = NEW_NAMES_PER_HOUR):
        self.share, self.ip_share, self.burst, self.ip_burst = share, ip_share, burst, ip_burst
        self.new_names_per_hour = new_names_per_hour  # 0: no allowance per address
        self.max_errors, self.error_window, self.max_entries = max_errors, error_window, max_entries
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def keys_for(self, address: str, name: str | None) -> tuple:
        """The keys a connection from `address` (an address_key), proved as `name` (or not
        yet), is billed to."""
        keys = (("ip", address),) if self.ip_share else ()
        return (*keys, ("user", name)) if name is not None and self.share else keys

    def _rate(self, key: tuple) -> tuple[float, float]:
        """(refill per second, burst) of `key`'s kind."""
        kind = key[0]
        if kind == "user":
            return self.share, self.burst
        if kind == "ip":
            return self.ip_share, self.ip_burst
        return self.new_names_per_hour / 3600, self.new_names_per_hour

    def _refill(self, key: tuple, entry: _Entry, now: float) -> float:  # called with _lock held
        """Bring `entry` up to `now`; returns its refill per second."""
        share, burst = self._rate(key)
        elapsed = now - entry.at if now > entry.at else 0.0  # threads' clock reads may cross
        entry.budget = min(burst, entry.budget + elapsed * share)
        entry.at = max(entry.at, now)
        return share

    def _entry(self, key: tuple, now: float) -> _Entry:  # called with _lock held
        entries = self._entries
        entry = entries.get(key)
        if entry is not None:
            entries.move_to_end(key)
            return entry
        while entries:  # idle entries from the old end, a few per new key: memory follows use
            oldest_key, oldest = next(iter(entries.items()))
            if not self._idle(oldest_key, oldest, now):
                break
            entries.popitem(last=False)
        if len(entries) >= self.max_entries:  # at the cap the least recently used goes, idle or not
            entries.popitem(last=False)
        entry = entries[key] = _Entry(self._rate(key)[1], now)
        return entry

    def _idle(self, key: tuple, entry: _Entry, now: float) -> bool:
        share, burst = self._rate(key)
        refilled = share <= 0 or entry.budget + (now - entry.at) * share >= burst
        return refilled and (not entry.refusals or now - entry.refusals[-1] > self.error_window)

    def charge(self, keys: tuple, cpu: float, now: float) -> float:
        """Bill `cpu` seconds to each key. Returns how long the connection that spent it must
        wait so that every one of its keys is back within its share (0: not at all)."""
        pause = 0.0
        with self._lock:
            for key in keys:
                entry = self._entry(key, now)
                share = self._refill(key, entry, now)
                entry.budget -= cpu
                if entry.budget < 0:
                    pause = max(pause, -entry.budget / share)
        return pause

    def take_new_name(self, address: str, now: float) -> float:
        """One new name pinned from `address` (an address_key), out of its --new-names-per-hour.
        0 when it is taken; otherwise nothing is taken, and the result is how many seconds until
        the allowance has a name again."""
        if self.new_names_per_hour <= 0:
            return 0.0
        key = ("names", address)
        with self._lock:
            entry = self._entry(key, now)
            per_second = self._refill(key, entry, now)
            if entry.budget < 1:
                return (1 - entry.budget) / per_second
            entry.budget -= 1
            return 0.0

    def refused(self, name: str, now: float) -> bool:
        """Count a refusal against `name`, over all its connections. True when the last
        max_errors of them fall within error_window: the connection must close."""
        with self._lock:
            entry = self._entry(("user", name), now)
            if entry.refusals is None or entry.refusals.maxlen != self.max_errors:  # made, or the limit changed
                entry.refusals = collections.deque(entry.refusals or (), maxlen=self.max_errors)
            refusals = entry.refusals
            refusals.append(now)
            return len(refusals) == refusals.maxlen and now - refusals[0] <= self.error_window

    def refusal_wait(self, name: str, now: float) -> float:
        """0, unless `name`'s last max_errors refusals all fall within error_window: then how long
        until the oldest leaves it. A name that was closed for its refusals waits this out on
        its next connection, so logging in again and again buys it nothing."""
        with self._lock:
            entry = self._entries.get(("user", name))
            refusals = entry.refusals if entry is not None else None
            if not refusals or len(refusals) < self.max_errors:
                return 0.0
            return max(0.0, refusals[0] + self.error_window - now)

    def sweep(self, now: float) -> None:
        """Drop idle entries from the least recently used end (the watchdog's tick)."""
        with self._lock:
            entries = self._entries
            while entries:
                key, entry = next(iter(entries.items()))
                if not self._idle(key, entry, now):
                    return
                entries.popitem(last=False)

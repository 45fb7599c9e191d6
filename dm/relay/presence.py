"""Presence: who is told when a user comes online or goes offline, and when someone joins or
leaves a channel. The node stores no message; this is what lets a sender's client keep a
message for an offline peer and send it the moment that peer connects.

A user hears about X when it watches X (an explicit `watch`, a `lookup` of X, or a `send` to X
that X was offline for), or when it shares a channel with X. Watches belong to the watcher's
session: they end when it goes offline. The node's sessions reach the outside only through the
`notify(name, message)` callable, so that a cluster can later carry the same five calls
(subscribe, unsubscribe, publish_online / publish_offline / publish_joined / publish_left)
across nodes.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

from dm import wire
from dm.wire import ProtocolError

MAX_WATCHES = 256  # presence subscriptions per user (node.py --max-watches)


class Presence:
    """watcher -> the names it watches, and the reverse index, bounded per watcher.

    Thread-safety: every connection thread may call any method; `_lock` guards both indexes,
    and is never held while a notice is written (targets are collected under it, written after).
    `channel_members(name)` (channel -> frozenset of members, for each channel of `name`) and
    `notify(name, frame)` (writes to that user's session if it is online) must be safe to call from any thread.
    """

    def __init__(self, notify: Callable[[str, bytes], None],
                 channels_of: Callable[[str], Iterable[frozenset]], max_watches: int = MAX_WATCHES):
        self._notify, self._channels_of, self.max_watches = notify, channels_of, max_watches
        self._watching: dict[str, set[str]] = {}  # watcher -> names
        self._watchers: dict[str, set[str]] = {}  # name -> watchers
        self._lock = threading.Lock()

    # --- subscriptions ------------------------------------------------------------------

    def subscribe(self, watcher: str, names: list[str], strict: bool = True) -> None:
        """`watcher` hears when each of `names` comes or goes. Past the cap: ProtocolError
        `watch_limit` when `strict` (an explicit watch; nothing of it is added), otherwise the
        names that do not fit are skipped (a watch implied by a lookup or a send)."""
        with self._lock:
            watching = self._watching.setdefault(watcher, set())
            new = [n for n in dict.fromkeys(names) if n not in watching and n != watcher]
            room = self.max_watches - len(watching)
            if len(new) > room:
                if strict:
                    if not watching:
                        del self._watching[watcher]
                    raise ProtocolError("watch_limit", f"you may watch at most {self.max_watches} names; "
                                        f"you watch {len(watching)}: unwatch some first")
                new = new[:max(room, 0)]
            for name in new:
                watching.add(name)
                self._watchers.setdefault(name, set()).add(watcher)
            if not watching:
                del self._watching[watcher]

    def unsubscribe(self, watcher: str, names: list[str] | None = None) -> None:
        """Stop watching `names`; None: all of them (the watcher went offline)."""
        with self._lock:
            watching = self._watching.get(watcher)
            if not watching:
                return
            for name in list(watching) if names is None else names:
                if name in watching:
                    watching.discard(name)
                    watchers = self._watchers.get(name)
                    if watchers is not None:
                        watchers.discard(watcher)
                        if not watchers:
                            del self._watchers[name]
            if not watching:
                del self._watching[watcher]

    def watching(self, watcher: str) -> set[str]:
        with self._lock:
            return set(self._watching.get(watcher, ()))

    # --- notices ------------------------------------------------------------------------

    def publish_online(self, name: str) -> None:
        self._tell(self._audience(name), {"type": "presence", "name": name, "online": True})

    def publish_offline(self, name: str) -> None:
        self._tell(self._audience(name), {"type": "presence", "name": name, "online": False})

    def publish_joined(self, channel: str, name: str, members: frozenset) -> None:
        self._tell(members - {name}, {"type": "membership", "channel": channel, "name": name, "joined": True})

    def publish_left(self, channel: str, name: str, members: frozenset) -> None:
        """`members`: those still in the channel after `name` left."""
        self._tell(members - {name}, {"type": "membership", "channel": channel, "name": name, "joined": False})

    def _audience(self, name: str) -> set[str]:
        """Who hears about `name`: its watchers and the members of its channels."""
        with self._lock:
            audience = set(self._watchers.get(name, ()))
        for members in self._channels_of(name):
            audience |= members
        audience.discard(name)
        return audience

    def _tell(self, names: Iterable[str], message: dict) -> None:
        frame = wire.encode(message)  # one encoding for every listener
        for target in names:
            self._notify(target, frame)

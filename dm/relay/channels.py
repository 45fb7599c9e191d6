"""Channels: named sets of users, kept on disk so that offline members stay members.

The node never fans out: the sender encrypts and pays one copy per member, and each copy is
an ordinary `send` with a `channel` label that the node checks against this registry.

A join or a leave costs the same whatever the number of channels: one fsynced line appended
to channels.jsonl (dm.relay.snapshot_log), a copy of that one channel's member set, and an
O(log n) insert into the sorted list of names that pages the `channels` reply.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path

from sortedcontainers import SortedList

from dm.relay.snapshot_log import SnapshotLog

MAX_CHANNELS_PER_USER = 100  # channels one user may be in at once (node.py --max-channels)
# Members of one channel (node.py --max-members). A channel message is one paid, encrypted copy
# per member, sent by the sender's client: 1,000 copies is already a large fan-out per line.
MAX_MEMBERS = 1000
CHANNELS_PAGE = 100  # channels per `channels` reply (docs/PROTOCOL.md, `channels`)


def _apply(channels: dict, entry: dict) -> None:
    members = channels.setdefault(entry["channel"], [])
    if entry["op"] == "join":
        if entry["name"] not in members:
            members.append(entry["name"])
    else:
        if entry["name"] in members:
            members.remove(entry["name"])
        if not members:
            del channels[entry["channel"]]


class ChannelRegistry:
    """channel -> frozenset of member names, on disk as channels.json plus channels.jsonl;
    also name -> its channels, and the channel names in order.

    Thread-safety: copy-on-write. join() and leave() run under the registry's own lock (which
    no other part of the node takes, so the fsync inside holds up nobody else) and replace a
    channel's frozenset; readers, the hot path among them, read `members` without a lock and
    see the old set or the new one, never a set being changed. `_joined` and `_names` are
    read and written only under the lock."""

    def __init__(self, path: Path, max_channels: int = MAX_CHANNELS_PER_USER, max_members: int = MAX_MEMBERS):
        self.max_channels, self.max_members = max_channels, max_members
        self._store = SnapshotLog(path, {}, _apply)
        self.members: dict[str, frozenset[str]] = {c: frozenset(m) for c, m in self._store.state.items() if m}
        self._store.state = None  # `members` is the state from here on; the snapshot copy is not kept
        self._joined: dict[str, set[str]] = {}
        for channel, members in self.members.items():
            for name in members:
                self._joined.setdefault(name, set()).add(channel)
        self._names = SortedList(self.members)
        self._lock = threading.Lock()

    def join(self, channel: str, name: str, capped: bool = True) -> str:
        """"joined", "already" (a member), "too_many_channels" (name is in max_channels) or
        "full" (the channel has max_members). `capped` False: a join the network of nodes
        accepted already (dm.cluster.directory), which this node must mirror whatever its caps."""
        with self._lock:
            members = self.members.get(channel, frozenset())
            if name in members:
                return "already"
            joined = self._joined.get(name, ())
            if capped and len(joined) >= self.max_channels:
                return "too_many_channels"
            if capped and len(members) >= self.max_members:
                return "full"
            self._store.append({"op": "join", "channel": channel, "name": name})
            self.members[channel] = members | {name}
            self._joined.setdefault(name, set()).add(channel)
            if not members:
                self._names.add(channel)
            self._compact_if_due()
            return "joined"

    def leave(self, channel: str, name: str) -> bool:
        """False when `name` was not a member."""
        with self._lock:
            members = self.members.get(channel, frozenset())
            if name not in members:
                return False
            self._store.append({"op": "leave", "channel": channel, "name": name})
            if len(members) == 1:
                del self.members[channel]
                self._names.remove(channel)
            else:
                self.members[channel] = members - {name}
            joined = self._joined[name]
            joined.discard(channel)
            if not joined:
                del self._joined[name]
            self._compact_if_due()
            return True

    def _compact_if_due(self) -> None:  # with _lock held
        if self._store.needs_compaction(len(self.members)):
            self._store.compact({c: sorted(m) for c, m in self.members.items()})

    def joined_by(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._joined.get(name, ()))

    def page(self, after: str | None = None, limit: int = CHANNELS_PAGE) -> tuple[dict[str, int], bool]:
        """Up to `limit` channels whose names sort after `after` (from the first when None),
        each with its member count, and whether more follow."""
        with self._lock:
            names = self._names
            start = 0 if after is None else names.bisect_right(after)
            chosen = list(itertools.islice(names.islice(start), limit + 1))
            members = self.members
            return {c: len(members[c]) for c in chosen[:limit]}, len(chosen) > limit

    def __len__(self) -> int:
        return len(self.members)

    def close(self) -> None:
        self._store.close()

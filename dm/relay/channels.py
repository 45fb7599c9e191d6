"""Channels: named sets of users, kept on disk so that offline members stay members.

The node never fans out: the sender encrypts and pays one copy per member, and each copy is
an ordinary `send` with a `channel` label that the node checks against this registry.
"""
from __future__ import annotations

import threading
from pathlib import Path

from dm.relay.snapshot_log import SnapshotLog


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
    """channel -> frozenset of member names, on disk as channels.json plus channels.jsonl.

    Thread-safety: copy-on-write. join() and leave() run under the registry's own lock (which
    no other part of the node takes, so the fsync inside holds up nobody else) and replace a
    channel's frozenset; readers, the hot path among them, read `members` without a lock and
    see the old set or the new one, never a set being changed."""

    def __init__(self, path: Path):
        self._store = SnapshotLog(path, {}, _apply)
        self.members: dict[str, frozenset[str]] = {c: frozenset(m) for c, m in self._store.state.items() if m}
        self._lock = threading.Lock()

    def join(self, channel: str, name: str) -> bool:
        """False when `name` was a member already."""
        with self._lock:
            members = self.members.get(channel, frozenset())
            if name in members:
                return False
            self._store.append({"op": "join", "channel": channel, "name": name})
            self.members[channel] = members | {name}
            return True

    def leave(self, channel: str, name: str) -> bool:
        """False when `name` was not a member."""
        with self._lock:
            members = self.members.get(channel, frozenset())
            if name not in members:
                return False
            self._store.append({"op": "leave", "channel": channel, "name": name})
            if len(members) == 1:
                del self.members[channel]
            else:
                self.members[channel] = members - {name}
            return True

    def joined_by(self, name: str) -> list[str]:
        return sorted(c for c, members in list(self.members.items()) if name in members)

    def sizes(self) -> dict[str, int]:
        return {c: len(members) for c, members in sorted(list(self.members.items()))}

    def close(self) -> None:
        self._store.close()

"""Who is online on the other nodes: each node announces its own users on `dm.presence`.

Deltas go out as users come and go; a full list goes out every `interval` seconds, so a new
node learns everyone within one interval and a node that died (SIGKILL, no goodbye) drops out
after `3 * interval`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

log = logging.getLogger("node")
SUBJECT = "dm.presence"


class Presence:
    """Thread-safety: `_remote` (node id -> (frozenset of names, last heard, monotonic)) is
    written only on the bridge's loop thread, one tuple replaced per message; readers on any
    thread take a snapshot of it (list of items) and never see a set being changed."""

    def __init__(self, bridge, node, node_id: str, interval: float = 1.0):
        self.bridge, self.node, self.node_id, self.interval = bridge, node, node_id, interval
        self._remote: dict[str, tuple[frozenset, float]] = {}
        self._task = None

    async def start(self) -> None:
        await self.bridge.nc.subscribe(SUBJECT, cb=self._on_message)
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:  # a goodbye, so the others need not wait for the timeout
            await self.bridge.nc.publish(SUBJECT, json.dumps({"node": self.node_id, "names": []}).encode())
        except Exception:
            pass

    async def _heartbeat(self) -> None:
        while True:
            try:
                names = sorted(self.node.online)
                await self.bridge.nc.publish(SUBJECT, json.dumps({"node": self.node_id, "names": names}).encode())
            except Exception as exc:  # NATS reconnecting: the next beat goes out after it
                log.debug("cluster: presence heartbeat failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def announce(self, name: str, online: bool) -> None:
        await self.bridge.nc.publish(SUBJECT, json.dumps(
            {"node": self.node_id, "online" if online else "offline": name}).encode())

    async def _on_message(self, msg) -> None:
        try:
            event = json.loads(msg.data)
            origin = event["node"]
        except (ValueError, KeyError, TypeError):
            return
        if origin == self.node_id:
            return
        now = time.monotonic()
        names = self._remote.get(origin, (frozenset(), now))[0]
        if "names" in event:
            names = frozenset(event["names"])
        elif "online" in event:
            names = names | {event["online"]}
        elif "offline" in event:
            names = names - {event["offline"]}
        self._remote[origin] = (names, now)

    def remote_names(self) -> set[str]:
        """Users connected to the other nodes that were heard from lately."""
        cutoff = time.monotonic() - 3 * self.interval
        found: set[str] = set()
        for names, heard in list(self._remote.values()):
            if heard >= cutoff:
                found |= names
        return found

    def is_online_elsewhere(self, name: str) -> bool:
        cutoff = time.monotonic() - 3 * self.interval
        return any(heard >= cutoff and name in names for names, heard in list(self._remote.values()))

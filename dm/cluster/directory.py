"""The network's shared records in JetStream key-value buckets.

    dm_pins      name -> {public_key, eth_address}   created once: a name is pinned network-wide
    dm_names     skeleton -> name                    created once: a look-alike is refused network-wide
    dm_members   <channel>.<member> -> "1"           put on join, deleted on leave

Keys are hex (names and channels may hold characters NATS keys do not allow). Each node keeps
its on-disk pins (dm.relay.pins) as a cache, filled by watching `dm_pins`, and as the record for
running alone, and mirrors channel membership into its ChannelRegistry: the send rule and
lookups read both without a round trip.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading

from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError

from dm.relay.names import skeleton

log = logging.getLogger("node")
PINS, NAMES, CHANNELS = "dm_pins", "dm_names", "dm_members"


def _key(text: str) -> str:
    return text.encode().hex()


async def open_bucket(js, bucket: str, replicas: int):
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=bucket, history=1, replicas=replicas)


class Directory:
    """Pins and channels shared by every node.

    Thread-safety: the buckets are used only by coroutines on the bridge's loop; connection
    threads reach them through the blocking methods here (bridge.call). The channel mirror's
    `_revisions` ((channel, member) -> last KV revision applied to the local registry) and the apply
    itself are under `_mirror_lock`, which only this class takes: the watcher (on the pool)
    and a connection thread that just joined may both apply, the newer revision wins."""

    def __init__(self, bridge, node, replicas: int, timeout: float):
        self.bridge, self.node, self.replicas, self.timeout = bridge, node, replicas, timeout
        self.pins = self.names = self.channels = None
        self._revisions: dict[str, int] = {}
        # names seen in dm_pins (the watch adds them; set.add and `in` are atomic, so readers take
        # no lock): a pin cached here may also be one this node made alone, before joining
        self.in_network: set[str] = set()
        self._mirror_lock = threading.Lock()
        self._watcher = self._pin_watcher = None
        self._watch_tasks: list = []

    async def start(self) -> None:
        js = self.bridge.js
        self.pins = await open_bucket(js, PINS, self.replicas)
        self.names = await open_bucket(js, NAMES, self.replicas)
        self.channels = await open_bucket(js, CHANNELS, self.replicas)
        await self._start_watching()
        self.bridge.on_reconnect.append(self._rewatch)

    async def _start_watching(self) -> None:
        self._watcher = await self.channels.watchall()
        self._pin_watcher = await self.pins.watchall()
        loop = asyncio.get_running_loop()
        self._watch_tasks = [loop.create_task(self._watch_channels()), loop.create_task(self._watch_pins())]

    async def _rewatch(self) -> None:
        """After NATS moved this node to another server, watch afresh: a watch may stall across
        the move, and a new one replays every current record (applying one twice is harmless:
        the newer revision wins)."""
        await self.stop()
        for attempt in range(20):
            try:
                await self._start_watching()
                log.info("cluster: watching pins and channels again")
                return
            except Exception as exc:  # JetStream may still be electing on the servers left
                log.debug("cluster: watching again failed (%s), attempt %d", exc, attempt + 1)
                await asyncio.sleep(0.5)
        log.error("cluster: could not watch pins and channels again; restart this node")

    async def stop(self) -> None:
        for task in self._watch_tasks:
            task.cancel()
        for watcher in (self._watcher, self._pin_watcher):
            if watcher is not None:
                try:
                    await watcher.stop()
                except Exception:  # its subscription went with the old server
                    pass

    # --- pins ---------------------------------------------------------------------------

    async def _get_json(self, bucket, key: str):
        try:
            entry = await bucket.get(key)
        except KeyNotFoundError:
            return None, None
        if entry.value is None:
            return None, entry.revision
        return json.loads(entry.value), entry.revision

    async def _watch_pins(self) -> None:
        """Every pin made anywhere is cached in this node's PinStore as it appears, so lookups
        and the send rule find it here without a round trip."""
        async for entry in self._pin_watcher:
            if entry is None or not entry.value:
                continue
            try:
                name = bytes.fromhex(entry.key).decode()
                record = json.loads(entry.value)
                await self.bridge.offload(self.cache_pin, name, record)
            except Exception:  # one bad record must not end the watch
                log.exception("cluster: caching the pin %s failed", entry.key)

    def cache_pin(self, name: str, record: dict) -> None:
        self.in_network.add(name)
        if self.node.pins.pin(name, record["public_key"], record["eth_address"]) == "conflict":
            log.warning("cluster: %s is pinned to another key here than in the network; this node keeps its own "
                        "pin (it ran alone before joining)", name)

    def pin_of(self, name: str) -> dict | None:
        """The network's pin for `name`, None when nobody has it."""
        return self.bridge.call(self._get_json(self.pins, _key(name)), self.timeout)[0]

    def name_like(self, name: str) -> str | None:
        """The pinned name that `name` looks like (its skeleton's owner), if it is not `name`."""
        owner = self.bridge.call(self._get_json(self.names, _key(skeleton(name))), self.timeout)[0]
        return owner if owner is not None and owner != name else None

    def claim(self, name: str, public_key: str, eth_address: str) -> str:
        """Pin `name` network-wide: "new", "same", "moved", "conflict" or "confusable"."""
        return self.bridge.call(self._claim(name, public_key, eth_address), self.timeout)

    async def _claim(self, name: str, public_key: str, eth_address: str) -> str:
        skeleton_key = _key(skeleton(name))
        try:
            await self.names.create(skeleton_key, json.dumps(name).encode())
        except KeyWrongLastSequenceError:
            owner, _ = await self._get_json(self.names, skeleton_key)
            if owner != name:
                return "confusable"
        record = {"public_key": public_key, "eth_address": eth_address}
        key = _key(name)
        try:
            await self.pins.create(key, json.dumps(record).encode())
            return "new"
        except KeyWrongLastSequenceError:
            pinned, revision = await self._get_json(self.pins, key)
        if pinned is None or pinned["public_key"].strip() != public_key.strip():
            return "conflict"
        if pinned["eth_address"] == eth_address:
            return "same"
        try:  # same key, new Ethereum account: the key holder may move its pin
            await self.pins.update(key, json.dumps(record).encode(), last=revision)
        except KeyWrongLastSequenceError:
            pass  # moved concurrently by the same key holder; either account is theirs
        return "moved"

    # --- channels -------------------------------------------------------------------------
    # One key per (channel, member), "<hex channel>.<hex name>": a join is a put and a leave a
    # delete, so a thousand members joining at once never contend for one record.

    def change_membership(self, channel: str, name: str, join: bool) -> bool:
        """Join or leave network-wide, then mirror locally. For a leave, False when `name` was
        not a member."""
        changed, revision = self.bridge.call(self._change(channel, name, join), self.timeout)
        if changed:
            self._mirror(channel, name, join, revision)
        return changed

    async def _change(self, channel: str, name: str, join: bool):
        key = f"{_key(channel)}.{_key(name)}"
        if join:
            return True, await self.channels.put(key, b"1")
        try:
            entry = await self.channels.get(key)
        except KeyNotFoundError:
            return False, None
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return False, None
        await self.channels.delete(key)
        return True, None

    async def _watch_channels(self) -> None:
        async for entry in self._watcher:
            if entry is None:
                continue  # the end of the initial values
            try:
                channel_hex, name_hex = entry.key.split(".")
                channel, name = bytes.fromhex(channel_hex).decode(), bytes.fromhex(name_hex).decode()
            except ValueError:
                continue
            join = entry.operation not in ("DEL", "PURGE")
            try:
                await self.bridge.offload(self._mirror, channel, name, join, entry.revision)
            except Exception:
                log.exception("cluster: mirroring %s in %s failed", name, channel)

    def _mirror(self, channel: str, name: str, join: bool, revision: int | None) -> None:
        """Apply one membership change to the local registry (fsync inside), unless a newer one
        for the same member was applied already. `revision` None: a leave done here just now."""
        registry = self.node.channels
        with self._mirror_lock:
            key = (channel, name)
            if revision is not None:
                if revision <= self._revisions.get(key, 0):
                    return
                self._revisions[key] = revision
            if join:  # the network has it: every node's registry must agree, whatever its caps
                registry.join(channel, name, capped=False)
            else:
                registry.leave(channel, name)

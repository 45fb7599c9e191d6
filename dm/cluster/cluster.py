"""The hub the relay node talks to when it runs with --cluster: the hooks in dm.relay."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

from dm.cluster.bridge import Bridge, ClusterUnavailable
from dm.cluster.claims import CLAIMS_MAX_AGE, CLAIMS_MAX_PER_NODE, ClaimForwarder
from dm.cluster.directory import Directory
from dm.cluster.presence import Presence
from dm.cluster.routing import Router
from dm.wire import ProtocolError

log = logging.getLogger("node")
SETUP_SECONDS = 30  # a cluster that just started elects its JetStream leader first
_UNANSWERED = object()  # resolve(): the network did not answer


class Cluster:
    """One node's membership of the network. Every method here is for the relay's threads
    (connection threads, the node); each part states its own thread-safety rule. Its own
    `_resolving` (pins being fetched) is read and written only under `_resolving_lock`."""

    def __init__(self, node, servers: list[str], *, replicas: int | None = None, timeout: float = 2.0,
                 max_in_flight: int = 10_000, presence_interval: float = 1.0,
                 claims_max_age: float = CLAIMS_MAX_AGE, claims_max: int = CLAIMS_MAX_PER_NODE):
        self.node, self.servers, self.timeout = node, servers, timeout
        self._claims_limits = {"max_age": claims_max_age, "max_per_node": claims_max}
        self.node_id = node.node_id
        self.bridge = Bridge(servers, name=f"dm-node-{self.node_id[:8]}", request_timeout=timeout)
        self._replicas = replicas
        self.router = Router(self.bridge, node, self.node_id, timeout, max_in_flight)
        self.presence = Presence(self.bridge, node, self.node_id, presence_interval)
        self.directory: Directory | None = None
        self.claims: ClaimForwarder | None = None
        # name -> the fetch of its pin under way (resolve); entries live only while one runs
        self._resolving: dict[str, concurrent.futures.Future] = {}
        self._resolving_lock = threading.Lock()

    def start(self) -> None:
        self.bridge.start()
        replicas = self._replicas or min(3, max(len(self.servers), len(self.bridge.nc.servers)))
        self.directory = Directory(self.bridge, self.node, replicas, self.timeout)
        self.claims = ClaimForwarder(self.bridge, self.node, self.node_id, replicas, self.timeout,
                                     **self._claims_limits)
        self.bridge.call(self._setup(), timeout=SETUP_SECONDS + 5)
        log.info("cluster: node %s joined the network at %s (JetStream replicas %d)", self.node_id[:8],
                 ",".join(self.servers), replicas)

    async def _setup(self) -> None:
        deadline = time.monotonic() + SETUP_SECONDS
        while True:  # right after the servers start, JetStream has no leader for a moment
            try:
                await self.directory.start()
                await self.claims.start()
                break
            except Exception as exc:
                log.debug("cluster: JetStream not ready yet: %r", exc)
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(f"JetStream is not ready on {','.join(self.servers)} ({exc}): "
                                             "start nats-server with -js, in a cluster of at least "
                                             "--cluster-replicas servers") from None
                await asyncio.sleep(0.5)
        await self.presence.start()

    def stop(self) -> None:
        try:
            self.bridge.call(self._teardown(), timeout=2 * self.timeout + 5)
        except Exception:  # NATS may be gone already
            pass
        self.bridge.stop()
        self.router.writers.stop()

    async def _teardown(self) -> None:
        await self.presence.stop()
        if self.claims is not None:
            await self.claims.stop()
        if self.directory is not None:
            await self.directory.stop()

    # --- who is online --------------------------------------------------------------------

    def user_online(self, name: str) -> None:
        """A user proved its name here: route its messages here from now on."""
        try:
            self.bridge.call(self._online(name), self.timeout)
        except Exception as exc:
            log.warning("cluster: could not announce %s (%s); other nodes reach them once NATS is back", name, exc)

    async def _online(self, name: str) -> None:
        await self.router.subscribe(name)
        await self.presence.announce(name, True)

    def user_offline(self, name: str) -> None:
        self.bridge.submit(self._offline(name))

    async def _offline(self, name: str) -> None:
        try:
            await self.router.unsubscribe(name)
            await self.presence.announce(name, False)
        except Exception as exc:
            log.debug("cluster: announcing %s offline: %s", name, exc)

    def remote_names(self) -> set[str]:
        return self.presence.remote_names()

    def is_online_elsewhere(self, name: str) -> bool:
        return self.presence.is_online_elsewhere(name)

    # --- routing and claims -----------------------------------------------------------------

    def route(self, transport, delivery: tuple, body: bytes) -> None:
        """A reserved delivery for a user not connected here (a connection thread). The ledger
        knows `delivery` by identity: the router releases or confirms that very tuple."""
        paid_by = delivery[3]  # the bounty key and its payer (dm.relay.ledger.paying)
        if paid_by[0] == "book":  # the leaf hash lets the recipient's node check the code
            book = self.node.index.announced_book(paid_by[1], paid_by[3])
            pay = [*paid_by[:3], book.tree.tree.leaf(paid_by[2]).hex()]
        else:
            pay = [*paid_by[:2], "", ""]
        # The recipient's node releases this node's layer key for a valid code (key release
        # across nodes): the nodes of one network trust each other with it, never a client.
        pay.append(self.node.layer.key(delivery[1], delivery[0], paid_by).hex())
        # ...and only until this node could still redeem the code (chain time): later, it
        # refuses the claim `expired`, as this node would (dm.relay.session.on_claim).
        expiry = self.node.index.bounty_expiry(paid_by)  # None: forgotten since the rule checked it
        pay.append(round(expiry - self.node.claim_margin, 3) if expiry is not None else 0)
        self.router.route(transport, delivery, body, pay)

    def forward_claim(self, delivery: tuple, code_hex: str, transport) -> None:
        self.claims.forward(delivery, code_hex, transport)

    # --- pins and channels --------------------------------------------------------------------

    def _directory_call(self, function, *args, fatal: bool = False):
        try:
            return function(*args)
        except ClusterUnavailable as exc:
            raise ProtocolError("unavailable", f"{exc}: try again in a moment", fatal=fatal) from None

    def check_name(self, name: str, public_key: str) -> None:
        """At hello: refuse a name pinned elsewhere in the network to another key, or one that
        looks like a name pinned elsewhere. A name already in this node's pins (its own, or the
        network's cached) was checked there: no round trip for a returning user."""
        if self.node.pins.get(name) is not None:
            return
        pinned = self._directory_call(self.directory.pin_of, name, fatal=True)
        if pinned is not None and pinned["public_key"].strip() != public_key.strip():
            raise ProtocolError("name_taken", f"the name {name!r} is pinned to another key in this network of "
                                "nodes: use your original keys, or another name", fatal=True)
        if pinned is None:
            look_alike = self._directory_call(self.directory.name_like, name, fatal=True)
            if look_alike is not None:
                raise ProtocolError("name_confusable", f"the name {name!r} looks like {look_alike!r}, already "
                                    "pinned in this network of nodes: choose a clearly different name", fatal=True)

    def claim_name(self, name: str, public_key: str, eth_address: str) -> None:
        """At auth, after the proof: pin network-wide (create-only) before pinning here."""
        cached = self.node.pins.get(name)
        if name in self.directory.in_network and cached is not None \
                and cached["public_key"].strip() == public_key.strip() and cached["eth_address"] == eth_address:
            return  # the network's pin, already cached here: nothing to create
        outcome = self._directory_call(self.directory.claim, name, public_key, eth_address, fatal=True)
        if outcome == "conflict":
            raise ProtocolError("name_taken", f"the name {name!r} is pinned to another key in this network of "
                                "nodes: use your original keys, or another name", fatal=True)
        if outcome == "confusable":
            raise ProtocolError("name_confusable", f"the name {name!r} looks like a name already pinned in this "
                                "network of nodes: choose a clearly different name", fatal=True)

    def resolve(self, name: str, ref: str | None = None) -> dict | None:
        """A user pinned on another node: fetch the network's pin and cache it here; None when
        no node has it. When many connections ask for the same new name at once (a channel's
        members looking up its sender), one of them fetches and the others wait for it. Raises
        ProtocolError unavailable (with `ref`) when the network does not answer: the name may
        well exist, so it is not unknown_peer."""
        with self._resolving_lock:
            fetch = self._resolving.get(name)
            mine = fetch is None
            if mine:
                self._resolving[name] = fetch = concurrent.futures.Future()
        if not mine:
            try:
                pinned = fetch.result(self.timeout + 1)
            except concurrent.futures.TimeoutError:
                pinned = _UNANSWERED
        else:
            pinned = _UNANSWERED
            try:
                pinned = self.directory.pin_of(name)
                if pinned is not None:
                    self.node.pins.pin(name, pinned["public_key"], pinned["eth_address"])
            except ClusterUnavailable:
                pass
            finally:
                with self._resolving_lock:
                    del self._resolving[name]
                fetch.set_result(pinned)
        if pinned is _UNANSWERED:
            raise ProtocolError("unavailable", f"the network of nodes did not answer within {self.timeout:g}s "
                                f"whether {name[:40]!r} exists: try again in a moment", ref=ref)
        return pinned

    def change_membership(self, channel: str, name: str, join: bool) -> bool:
        return self._directory_call(self.directory.change_membership, channel, name, join)

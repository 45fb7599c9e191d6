"""The relay node: the parts every session shares, and their lifecycle.

    pins       name -> key, pinned at first proof (--max-pins)   dm.relay.pins
    channels   channel -> members, copy-on-write                 dm.relay.channels
    ledger     reservations, pending deliveries, claims, expiry  dm.relay.ledger
    index      which bounties and books pay this node            dm.relay.bounties
    journal    deliveries and returned codes, durably          dm.relay.journal
    redeemer   batched redemption, final after N confirmations  dm.relay.redeemer
    online     name -> the session that proved it                (here)
    presence   who hears of whom coming, going, joining, leaving dm.relay.presence
    server     sockets, threads, the watchdog                    dm.relay.server
    budgets    CPU shares and refusals, per address and per name dm.relay.budget
               and new names per address (--new-names-per-hour)
    send_rule  the one rule set for a send                       dm.relay.rules
    layer      the key-release layer over every relayed text     dm.relay.sealing
    cluster    with --cluster: the other nodes, over NATS         dm.cluster (None when alone)
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

from dm import datadir, wire
from dm.chain import ethereum
from dm.chain.faucet import Faucet
from dm.relay import CPU_SHARE, ERROR_WINDOW, MAX_BOOKS_PER_USER
from dm.relay.bounties import EXPIRY_MARGIN, REDEEM_MARGIN, BountyIndex
from dm.relay.budget import CPU_BURST, IP_CPU_BURST, IP_CPU_SHARE, MAX_BUDGETS, NEW_NAMES_PER_HOUR, Budgets
from dm.relay.channels import CHANNELS_PAGE, MAX_CHANNELS_PER_USER, MAX_MEMBERS, ChannelRegistry
from dm.relay.ledger import MAX_UNCLAIMED, DeliveryLedger
from dm.relay.pins import MAX_PINS, PinStore
from dm.relay.presence import MAX_WATCHES, Presence
from dm.relay.journal import DeliveryLog, Journal, restore
from dm.relay.redeemer import Redeemed, Redeemer
from dm.relay.rules import make_send_rule
from dm.relay.sealing import NodeLayer, load_secret
from dm.relay.server import Server

log = logging.getLogger("node")
EXPIRED_SWEEP_SECONDS = 5.0  # how often expired bounties and books are dropped


class Node:
    """Thread-safety of what it owns: `online` (name -> session) is written only under
    `_online_lock`, by a session that proves its name and by a connection thread that ends;
    sessions read it without the lock (a dict read sees a session or not; a stale one has a
    closed transport, and a write to it fails and releases its reservation). The parts above
    state their own rules."""

    def __init__(self, *, token: ethereum.BountyToken, signer: ethereum.Signer, data_dir: Path,
                 index: BountyIndex, redeemer_options: dict | None = None, faucet: Faucet | None = None,
                 host: str = "localhost", port: int = 12345, max_connections: int = 10_000,
                 handshake_timeout: float = 10, frame_timeout: float = 10, idle_timeout: float = 600,
                 max_errors: int = 20, error_window: float = ERROR_WINDOW, claim_timeout: float = 3600,
                 max_unclaimed: int = MAX_UNCLAIMED, max_books: int = MAX_BOOKS_PER_USER,
                 max_book_leaves: int = wire.MAX_BOOK_LEAVES, max_channels: int = MAX_CHANNELS_PER_USER,
                 max_members: int = MAX_MEMBERS, cpu_share: float = CPU_SHARE, ip_cpu_share: float = IP_CPU_SHARE,
                 max_budgets: int = MAX_BUDGETS, cpu_burst: float = CPU_BURST, ip_cpu_burst: float = IP_CPU_BURST,
                 max_watches: int = MAX_WATCHES, max_visible: int = wire.MAX_VISIBLE, max_pins: int = MAX_PINS,
                 new_names_per_hour: int = NEW_NAMES_PER_HOUR, clock=time.monotonic,
                 cluster_options: dict | None = None):
        self.token, self.signer, self.index, self.faucet = token, signer, index, faucet
        self.budgets = Budgets(share=cpu_share, ip_share=ip_cpu_share, burst=cpu_burst, ip_burst=ip_cpu_burst,
                               max_errors=max_errors, error_window=error_window, max_entries=max_budgets,
                               new_names_per_hour=new_names_per_hour)
        self.max_books, self.max_book_leaves = max_books, max_book_leaves
        # only a send may be larger (dm.wire.MAX_OTHER_FRAME), unless books may be: 67 bytes a leaf
        self.max_other_frame = max(wire.MAX_OTHER_FRAME, 70 * max_book_leaves + 1024)
        self.cpu_share = cpu_share  # of a core, per name, for general-path frames; 0: unpaced
        node_dir = data_dir / "node"
        self.node_id = datadir.ensure_secret(node_dir / "node_id", lambda: secrets.token_hex(16))
        self.pins = PinStore(node_dir / "pins.json", max_pins)
        self.channels = ChannelRegistry(node_dir / "channels.json", max_channels, max_members)
        self.ledger = DeliveryLedger(claim_timeout, max_unclaimed, index.bounty_expiry)
        self._swept_at = float("-inf")
        self.layer = NodeLayer(load_secret(node_dir), max_visible)
        self.clock = clock
        self.delivery_log = DeliveryLog(node_dir / "deliveries.log")
        self.delivery_log.feed = self.ledger.unjournaled  # the writer thread drains what the hot path appends
        # a claim is kept for a re-claim as long as an unclaimed delivery waits for its code
        self.redeemer = Redeemer(token, signer, index, Journal(node_dir / "journal.jsonl", claim_timeout),
                                 on_redeemed=self._on_redeemed, **(redeemer_options or {}))
        self.welcome = {"type": "welcome", "node_eth_address": signer.address,
                        "chain_id": token.w3.eth.chain_id, "contract": token.address}
        self.online: dict[str, object] = {}
        self._online_lock = threading.Lock()
        self.presence = Presence(self._notify, self._channels_of, max_watches)
        self._stop = threading.Event()
        self.cluster = None
        if cluster_options is not None:  # imported only here: a node alone never loads nats
            from dm.cluster.cluster import Cluster
            self.cluster = Cluster(self, **cluster_options)
        # What a bounty must have left: at a claim, enough for the redeemer to get its code mined
        # (--batch-wait plus a margin); at a send, more, so that its recipient has time to claim.
        self.claim_margin = REDEEM_MARGIN + self.redeemer.batch_wait
        self.send_rule = make_send_rule(self.pins.names, self.channels, index, self.online,
                                        resolve=self.cluster.resolve if self.cluster is not None else None,
                                        expiry_margin=EXPIRY_MARGIN + self.redeemer.batch_wait)
        self.server = Server(self, host, port, max_connections=max_connections,
                             handshake_timeout=handshake_timeout, frame_timeout=frame_timeout,
                             idle_timeout=idle_timeout, clock=clock)
        self.port = self.server.port

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.index.sync()
        pending, used = restore(self.delivery_log, self.redeemer.journal, self.ledger, self.clock,
                                self._still_payable, self._account_of)
        if pending or used:
            log.info("journal: %d delivery(ies) from an earlier run await their code; %d bounty(ies) stay used",
                     pending, used)
        self.delivery_log.start(self._stop)
        self.index.start_following(self._stop)
        self.redeemer.start()
        if self.faucet is not None:
            self.faucet.start()
        if self.cluster is not None:
            self.cluster.start()
        self.server.start()
        log.info("node %s listening on port %d; paid to %s on chain %s, contract %s", self.node_id[:8],
                 self.port, self.signer.address, self.welcome["chain_id"], self.token.address)

    def stop(self) -> None:
        """Stop accepting, close every connection, and redeem what is queued."""
        self._stop.set()
        self.server.stop()
        if self.cluster is not None:  # before the journal closes: forwarded codes are journaled
            self.cluster.stop()
        if self.faucet is not None:
            self.faucet.stop()
        self.redeemer.stop(flush=True)
        self.redeemer.journal.close()
        self.delivery_log.close()
        self.pins.close()
        self.channels.close()
        log.info("stopped; earned %d BTK this run", self.redeemer.earned)

    @property
    def relayed(self) -> int:
        return self.server.relayed

    # --max-errors and --error-window live with the refusals they count (dm.relay.budget)
    @property
    def max_errors(self) -> int:
        return self.budgets.max_errors

    @max_errors.setter
    def max_errors(self, value: int) -> None:
        self.budgets.max_errors = value

    @property
    def error_window(self) -> float:
        return self.budgets.error_window

    @error_window.setter
    def error_window(self, value: float) -> None:
        self.budgets.error_window = value

    # --- who is online ------------------------------------------------------------------

    def go_online(self, session) -> None:
        """`session` proved its name: it receives from now on; an older session of that name goes."""
        with self._online_lock:
            previous = self.online.get(session.name)
            self.online[session.name] = session
        if previous is not None and previous is not session:
            # never waits for the old connection: it may be one that stopped reading
            previous.transport.abort(wire.error("name_in_use", f"{session.name} connected again from elsewhere"))
        if self.cluster is not None:
            self.cluster.user_online(session.name)
        log.info("+ %s connected from %s", session.name, session.transport.address[0])
        if previous is None:  # a replaced session: the name never went offline
            self.presence.publish_online(session.name)

    def go_offline(self, session) -> None:
        if session.name is None:
            return
        with self._online_lock:
            if self.online.get(session.name) is not session:
                return
            del self.online[session.name]
        if self.cluster is not None:
            self.cluster.user_offline(session.name)
        log.info("- %s disconnected", session.name)
        self.presence.unsubscribe(session.name)
        self.presence.publish_offline(session.name)

    def is_online(self, name: str) -> bool:
        """Here, or (with --cluster) on another node of the network."""
        return name in self.online or (self.cluster is not None and self.cluster.is_online_elsewhere(name))

    def online_names(self) -> list[str]:
        names = set(self.online)
        if self.cluster is not None:
            names |= self.cluster.remote_names()
        return sorted(names)

    def _notify(self, name: str, frame: bytes) -> None:
        """A presence notice for `name`, if it is online (any thread; never waits on its socket)."""
        session = self.online.get(name)
        if session is not None:
            session.transport.post(frame)

    def _channels_of(self, name: str) -> list[frozenset]:
        return [members for members in list(self.channels.members.values()) if name in members]

    def channel_reply(self, name: str, channel: str | None = None, after: str | None = None) -> dict:
        """The asker's channels, and one page of every channel (CHANNELS_PAGE, after `after`)."""
        page, more = self.channels.page(after, CHANNELS_PAGE)
        reply = {"type": "channels", "joined": self.channels.joined_by(name), "all": page}
        if more:
            reply["more"] = True
        if channel:
            reply["channel"] = channel  # the one just joined or left
        return reply

    # --- keeping memory and disk bounded -------------------------------------------------

    def sweep(self, now: float) -> None:
        """The watchdog's tick: forget settled and timed-out deliveries, then, every
        EXPIRED_SWEEP_SECONDS, the bounties and books that expired on chain."""
        chain_now = self.index.clock()
        self.ledger.forget_settled(now, chain_now)
        self.budgets.sweep(now)
        if now - self._swept_at >= EXPIRED_SWEEP_SECONDS:
            self._swept_at = now
            dropped = self.index.forget_expired(chain_now)
            if dropped:
                log.info("dropped %d expired book(s)", dropped)

    # --- getting paid ---------------------------------------------------------------------

    def _still_payable(self, sender: str, paid_by: tuple) -> bool:
        """Whether a bounty recorded in an earlier run could still pay (so must stay used).
        `paid_by` names its payer (dm.relay.ledger.paying)."""
        return paid_by[0] in ("book", "single") and self.index.still_open(paid_by[-1], paid_by)

    def _account_of(self, sender: str) -> str | None:
        pin = self.pins.get(sender)
        return pin["eth_address"] if pin is not None else None

    def _on_redeemed(self, result: Redeemed) -> None:
        log.info("redeemed %d code(s) in tx %s (gas %d): +%d BTK, %d BTK this run", result.paid,
                 result.tx_hash, result.gas_used, result.paid, self.redeemer.earned)
        by_sender: dict[str, list[str]] = {}
        for claim in result.paid_claims:
            by_sender.setdefault(claim.sender, []).append(claim.msg_id)
        for sender, msg_ids in by_sender.items():
            session = self.online.get(sender)
            if session is not None:
                session.transport.post(wire.encode({"type": "paid", "msg_ids": msg_ids, "tx": result.tx_hash}))

"""Which bounties the node may accept.

`BountyIndex` follows BountyToken's events and keeps the open bounties and
books bound to this node, so checking a message costs no RPC round trip in
steady state; a miss falls back to one direct lookup.

Bounties and books are keyed on chain by (sender, code hash) and (sender, root), and so
here: a copy of Alice's registration by Mallory is Mallory's own bounty, and never
stands in for Alice's. A bounty or book leaves the index when its redemption or refund
is seen (also one from an earlier run: the index replays those events too, so a restarted
node does not take a bounty it already redeemed for open).

A chain that drops blocks the index has read (a reorg; a dev chain restarted from an older
state) may drop the `openBook` or `registerBounty` behind a bounty the index holds as open:
messages on it would be relayed, read, and never paid. So each sync first checks that the
last block it read is still the chain's; if not, the index forgets what events told it and
reads them again from the contract's deploy block.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dm.chain import ethereum
from dm.chain.books import KnownBook
from dm.relay import LOOKUPS_PER_SECOND
from dm.relay.outage import CHAIN

log = logging.getLogger("node")
# Seconds a bounty must still have to run when its code comes back, on top of --batch-wait: the
# node redeems a code within --batch-wait and one transaction, and must do so before the bounty
# expires, or it releases a key it is never paid for (dm.relay.session, on_claim).
REDEEM_MARGIN = 15
# Seconds a bounty must still have to run when a message is accepted (also on top of
# --batch-wait): the recipient then has at least EXPIRY_MARGIN - REDEEM_MARGIN to claim it.
EXPIRY_MARGIN = 30
MISS_SYNC_SECONDS = 0.25  # past the lookup budget, an unknown bounty catches the index up at most this often


@dataclass
class OpenBook:
    size: int
    expiry: int
    sender: str
    tree: KnownBook | None = None  # the leaves, once the sender has announced them


class BountyIndex:
    """Open bounties and books bound to `relayer`, kept from the contract's events, keyed by
    (sender address, code hash) and (sender address, root).

    A bounty the index does not know yet (a sender registers it, then sends at once) is looked
    up on the chain directly, within a budget of `lookups_per_second` for the whole node. Past
    the budget the index catches up with the contract's events instead, at most once per
    MISS_SYNC_SECONDS, and what is still missing then is unknown. So a flood of made-up
    bounties costs the chain a bounded number of calls a second, not one per frame.

    Thread-safety: sync() runs under `_sync_lock` (the follower thread, and connection threads
    on a miss); it, lookups and forget() write `_bounties`, `_single_senders` and `_books`
    under `_lock`, which also guards the lookup budget; readers take single dict reads
    without it. `books_by_hex` (the first announced book per root, for the hot path) and
    `_announced` are written by connection threads with one dict operation each and read
    without a lock: a (sender, root) always maps to the same OpenBook object (book() hands out
    the one in `_books`), whose `tree` is set once. `_expiring` (a heap of what the index
    holds, by expiry) and `announced_by` (sender -> the roots it announced) are written under
    `_lock`; forget_expired() drops what has expired from every table and from disk (the
    watchdog thread). `_last_read` and `_next_block` belong to sync (under `_sync_lock`);
    `_looked_up_at` is set under `_lock` and checked and cleared by sync. A rewind (_rewind:
    the chain dropped blocks the index had read, or read a lookup's answer from) clears
    every table under `_lock` and counts `rewinds`; a lookup inserts what it found (under
    `_lock`) only if no rewind happened since it asked, so a dropped book never comes back."""

    def __init__(self, token: ethereum.BountyToken, relayer: str, books_dir: Path | None = None,
                 clock: Callable[[], float] = time.time, from_block: int = 0,
                 lookups_per_second: float = LOOKUPS_PER_SECOND):
        self.token = token
        self.books_dir = books_dir  # announced leaves, kept so a restarted node can still redeem
        self.relayer = relayer
        self.clock = clock
        self._bounties: dict[tuple[str, bytes], int] = {}  # (sender, code hash) -> expiry
        self._single_senders: dict[bytes, str] = {}  # code hash -> a sender with that open bounty
        self._books: dict[tuple[str, bytes], OpenBook] = {}  # (sender, root) -> book
        self._closed: set[tuple[str, bytes]] = set()  # redeemed or refunded, seen in events
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._synced_at = float("-inf")  # time.monotonic() when the last sync started
        self._from_block = from_block  # the contract's deploy block: no events before it
        self._next_block = from_block
        self._last_read: tuple[int, bytes] | None = None  # (number, hash) of the last block synced
        # (number, hash) of the chain's head after the newest direct lookup that found a bounty:
        # that answer came from the chain as it then was, which the next sync checks too.
        self._looked_up_at: tuple[int, bytes] | None = None
        self.rewinds = 0  # how often the chain dropped blocks the index had read (_rewind)
        self.miss_syncs = 0  # syncs that unknown bounties caused
        self.lookups = 0  # direct chain lookups of unknown bounties
        self.lookups_per_second = lookups_per_second
        self._budget, self._budget_at = lookups_per_second, time.monotonic()  # a token bucket, under _lock
        self.books_by_hex: dict[str, OpenBook] = {}  # the first announced book per root hex, for the hot path
        self._announced: dict[tuple[str, str], OpenBook] = {}  # (root hex, sender) -> announced book
        self._expiring: list[tuple[int, tuple[str, bytes]]] = []  # heap of (expiry, key) of what is held above
        self.announced_by: dict[str, set[bytes]] = {}  # book sender's address -> roots it announced

    def sync(self) -> None:
        """Apply events from the blocks not seen yet."""
        with self._sync_lock:
            self._sync()

    def _sync(self) -> None:  # with _sync_lock held
        self._synced_at = time.monotonic()
        eth = self.token.w3.eth
        head = eth.get_block("latest")
        latest = head["number"]
        looked_up = self._looked_up_at
        if looked_up is not None and looked_up[0] > latest:
            looked_up = None  # a lookup after the head was read: the next sync checks it
        for seen in (looked_up, self._last_read):
            if seen is not None:
                number, block_hash = seen
                kept = head if number == latest else eth.get_block(number) if number < latest else None
                if kept is None or bytes(kept["hash"]) != block_hash:
                    self._rewind(number, latest)
                    break
        if latest < self._next_block:
            self._covered(looked_up)
            return
        span = {"from_block": self._next_block, "to_block": latest}
        ours = {"argument_filters": {"relayer": self.relayer}, **span}
        events = self.token.contract.events
        registered = events.BountyRegistered().get_logs(**ours)
        opened = events.BookOpened().get_logs(**ours)
        redeemed = events.BountyRedeemed().get_logs(**ours)
        # Refunds name no relayer: only those of bounties and books we know are applied.
        refunded = events.BountyRefunded().get_logs(**span)
        books_refunded = events.BookRefunded().get_logs(**span)
        with self._lock:
            for event in registered:
                args = event["args"]
                key = (args["sender"], bytes(args["codeHash"]))
                if key not in self._closed:
                    self._bounties[key] = args["expiry"]
                    self._single_senders[key[1]] = key[0]
                    heapq.heappush(self._expiring, (args["expiry"], key))
            for event in opened:
                args = event["args"]
                key = (args["sender"], bytes(args["root"]))
                if key not in self._books and key not in self._closed:
                    self._books[key] = OpenBook(args["size"], args["expiry"], args["sender"])
                    heapq.heappush(self._expiring, (args["expiry"], key))
            # A (sender, hash) is registered at most once ever, so closing after opening is safe
            # whatever the order of the events within this span.
            for event in [*redeemed, *refunded]:
                args = event["args"]
                self._close_single((args["sender"], bytes(args["codeHash"])))
            for event in books_refunded:
                args = event["args"]
                key = (args["sender"], bytes(args["root"]))
                if self._books.pop(key, None) is not None:
                    self._closed.add(key)
        self._next_block = latest + 1
        self._last_read = (latest, bytes(head["hash"]))
        self._covered(looked_up)

    def _covered(self, looked_up: tuple[int, bytes] | None) -> None:  # with _sync_lock held
        """The lookup note this sync checked is on the chain `_last_read` now ends: drop it, unless
        a newer lookup replaced it meanwhile. Only once the sync is complete: a sync that fails
        half-way (say, the chain rolled back under it) leaves it for the next one."""
        with self._lock:
            if looked_up is not None and self._looked_up_at is looked_up:
                self._looked_up_at = None

    def _rewind(self, number: int, latest: int) -> None:  # with _sync_lock held
        """The chain no longer holds block `number`, the last one synced: forget what events
        said, and read them again from the deploy block. Announced leaves stay on disk, and
        book() loads them again for a book the chain still holds."""
        log.warning("the chain no longer holds block %d, the last one read for bounties (now at %d): a reorg, or "
                    "the dev chain restarted from an older state; reading its bounties and books again", number, latest)
        with self._lock:
            self.rewinds += 1
            for table in (self._bounties, self._single_senders, self._books, self._closed, self._expiring,
                          self.books_by_hex, self._announced):
                table.clear()
        self._next_block = self._from_block
        self._last_read = self._looked_up_at = None

    def _note_lookup(self) -> None:
        """A direct lookup found a bounty: remember the head it was read under, for the next
        sync to check that the chain still holds it (a rollback may drop it before then)."""
        head = self.token.w3.eth.get_block("latest")
        with self._lock:
            if self._looked_up_at is None or head["number"] > self._looked_up_at[0]:
                self._looked_up_at = (head["number"], bytes(head["hash"]))

    def _close_single(self, key: tuple[str, bytes]) -> None:  # with _lock held
        if self._bounties.pop(key, None) is not None:
            self._closed.add(key)
            if self._single_senders.get(key[1]) == key[0]:
                del self._single_senders[key[1]]

    def _may_look_up(self) -> bool:
        """Take one direct lookup from the budget, if any is left."""
        with self._lock:
            now = time.monotonic()
            self._budget = min(self.lookups_per_second,
                               self._budget + (now - self._budget_at) * self.lookups_per_second)
            self._budget_at = now
            if self._budget < 1:
                return False
            self._budget -= 1
            self.lookups += 1
            return True

    def catch_up(self) -> None:
        """Something unknown arrived: sync with the chain's events unless a sync started less
        than MISS_SYNC_SECONDS ago, in which case what is unknown stays unknown for now.
        Concurrent misses share one sync."""
        with self._sync_lock:
            if time.monotonic() - self._synced_at < MISS_SYNC_SECONDS:
                return
            self.miss_syncs += 1
            self._sync()

    def start_following(self, stop: threading.Event, interval: float = 1.0) -> threading.Thread:
        def follow():
            while not stop.wait(interval):
                try:
                    self.sync()
                    CHAIN.answered()
                except Exception as exc:  # a flaky RPC must not kill the node
                    if not CHAIN.failed(exc, "new bounties"):
                        log.warning("event sync failed: %s", exc)

        thread = threading.Thread(target=follow, name="bounty-index", daemon=True)
        thread.start()
        return thread

    def single_payer(self, sender: str, code_hash: bytes, now: float | None = None,
                     margin: float = EXPIRY_MARGIN) -> str | None:
        """`sender` when its single bounty behind `code_hash` is open, bound to this node and not
        about to expire at `now` (chain time: it has more than `margin` seconds left). Otherwise
        another sender whose open bounty has that hash, if the index knows one (so the refusal can
        say whose it is), or None."""
        now = self.clock() if now is None else now
        key = (sender, code_hash)
        expiry = self._bounties.get(key)
        if expiry is None and key not in self._closed:
            if self._may_look_up():
                rewinds = self.rewinds
                info = self.token.bounty(sender, code_hash)
                if info.state == "open" and info.relayer == self.relayer:
                    expiry = info.expiry
                    self._note_lookup()
                    with self._lock:
                        if rewinds != self.rewinds:  # the chain dropped blocks meanwhile: ask again next time
                            return None
                        self._bounties[key] = expiry
                        self._single_senders.setdefault(code_hash, sender)
                        heapq.heappush(self._expiring, (expiry, key))
            else:
                self.catch_up()
                expiry = self._bounties.get(key)
        if expiry is None:
            return self._single_senders.get(code_hash)
        return sender if expiry > now + margin else None

    def book(self, sender: str, root: bytes) -> OpenBook | None:
        """`sender`'s book with that root bound to this node, None if there is none; with its
        leaves when the sender announced them (also before a restart)."""
        key = (sender, root)
        book = self._books.get(key)
        if book is None:
            if key in self._closed:
                return None
            if self._may_look_up():
                rewinds = self.rewinds
                info = self.token.book(sender, root)
                if info.relayer != self.relayer or info.refunded or info.size == 0:
                    return None
                self._note_lookup()
                with self._lock:
                    if rewinds != self.rewinds:  # the chain dropped blocks meanwhile: ask again next time
                        return None
                    book = self._books.get(key)
                    if book is None:
                        self._books[key] = book = OpenBook(info.size, info.expiry, sender)
                        heapq.heappush(self._expiring, (info.expiry, key))
            else:
                self.catch_up()
                book = self._books.get(key)
                if book is None:
                    return None
        if book.tree is None and self.books_dir is not None:
            saved = self._saved_leaves(sender, root)
            if saved.exists():
                try:
                    book.tree = KnownBook(root, [bytes.fromhex(x) for x in json.loads(saved.read_text())])
                except ValueError:
                    pass
        return book

    def _saved_leaves(self, sender: str, root: bytes) -> Path:
        return self.books_dir / f"{sender}-{root.hex()}.json"

    def announced_book(self, root_hex: str, sender: str) -> OpenBook | None:
        """`sender`'s open book bound to this node with that root (lower-case hex) whose leaves
        the sender has announced; None otherwise. A hit is one dict read (dm.relay.rules reads
        books_by_hex itself first); a miss catches up with the chain's events."""
        key = (root_hex, sender)
        book = self._announced.get(key)
        if book is None:
            generation = self.rewinds
            book = self.book(sender, bytes.fromhex(root_hex))
            if book is None or book.tree is None:
                return None
            with self._lock:
                if generation != self.rewinds:  # a rewind since: the book may be gone
                    return None
                self._announced[key] = book
                self.books_by_hex.setdefault(root_hex, book)
        return book

    def announce_book(self, sender: str, root: bytes, leaves: list[bytes], pause=None) -> OpenBook | None:
        """`sender` tells us the leaf hashes of its book, so we can check codes and build
        multiproofs ourselves. Returns None if no such book of `sender`'s pays us. `pause` is
        called between stretches of hashing (dm.chain.books.MerkleTree)."""
        book = self.book(sender, root)
        if book is None or len(leaves) != book.size:
            return None
        if book.tree is None:
            book.tree = KnownBook(root, leaves, pause)  # raises ValueError when the leaves do not make the root
            if self.books_dir is not None:
                self.books_dir.mkdir(parents=True, exist_ok=True)
                saved = self._saved_leaves(sender, root)
                tmp = saved.with_suffix(".tmp")
                tmp.write_text(json.dumps([leaf.hex() for leaf in leaves]))
                os.replace(tmp, saved)
            with self._lock:
                self.announced_by.setdefault(sender, set()).add(root)
        return book

    def still_open(self, sender: str, paid_by: tuple, now: float | None = None) -> bool:
        """Whether the bounty `paid_by` (dm.wire.bounty_key) of `sender` is known to the index as
        open and unexpired: a book not refunded, or a single bounty not redeemed or refunded."""
        now = self.clock() if now is None else now
        if paid_by[0] == "book":
            book = self._books.get((sender, bytes.fromhex(paid_by[1])))
            return book is not None and book.expiry >= now
        expiry = self._bounties.get((sender, bytes.fromhex(paid_by[1])))
        return expiry is not None and expiry >= now

    def forget(self, sender: str, code_hash: bytes) -> None:
        """The single bounty was redeemed: it pays no further message."""
        with self._lock:
            self._close_single((sender, code_hash))

    def bounty_expiry(self, paid_by: tuple) -> int | None:
        """The chain expiry of a delivery's bounty (with its payer: dm.relay.ledger.paying),
        None when the index no longer holds it (then it has expired, or was redeemed or refunded)."""
        if paid_by[0] == "book":
            root_hex, payer = paid_by[1], paid_by[-1]
            book = self.books_by_hex.get(root_hex)  # the usual case, as dm.relay.rules finds it
            if book is None or book.sender != payer:
                book = self._books.get((payer, bytes.fromhex(root_hex)))
            return book.expiry if book is not None else None
        if paid_by[0] == "single":
            return self._bounties.get((paid_by[-1], bytes.fromhex(paid_by[1])))
        return None

    def open_books_announced(self, sender: str, chain_now: float) -> int:
        """How many books `sender` announced that have not expired by `chain_now`."""
        with self._lock:
            roots = self.announced_by.get(sender, ())
            return sum(1 for root in roots
                       if (book := self._books.get((sender, root))) is not None and book.expiry > chain_now)

    def forget_expired(self, chain_now: float) -> int:
        """Drop every bounty and book that expired before `chain_now`, from memory and its
        leaves from disk: nothing can pay with it any more, and a code for it can no longer be
        redeemed (the contract refuses an expired bounty). Returns how many books were dropped."""
        dropped = []
        with self._lock:
            expiring = self._expiring
            while expiring and expiring[0][0] < chain_now:
                _, key = heapq.heappop(expiring)
                self._closed.discard(key)  # an expired key can never be opened again: no need to remember it
                if self._bounties.pop(key, None) is not None:
                    if self._single_senders.get(key[1]) == key[0]:
                        del self._single_senders[key[1]]
                book = self._books.pop(key, None)
                if book is not None:
                    sender, root = key
                    root_hex = root.hex()
                    if self.books_by_hex.get(root_hex) is book:
                        del self.books_by_hex[root_hex]
                    self._announced.pop((root_hex, sender), None)
                    roots = self.announced_by.get(sender)
                    if roots is not None:
                        roots.discard(root)
                        if not roots:
                            del self.announced_by[sender]
                    dropped.append(key)
        if self.books_dir is not None:
            for sender, root in dropped:
                self._saved_leaves(sender, root).unlink(missing_ok=True)
        return len(dropped)

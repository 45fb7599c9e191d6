"""Which bounties the node may accept.

`BountyIndex` follows BountyToken's events and keeps the open bounties and
books bound to this node, so checking a message costs no RPC round trip in
steady state; a miss falls back to one direct lookup.
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

log = logging.getLogger("node")
EXPIRY_MARGIN = 30  # seconds a bounty must still have to run when a message is accepted
MISS_SYNC_SECONDS = 0.25  # past the lookup budget, an unknown bounty catches the index up at most this often
LOOKUPS_PER_SECOND = 20  # direct chain lookups of unknown bounties, for the whole node (node.py --lookups)


@dataclass
class OpenBook:
    size: int
    expiry: int
    sender: str
    tree: KnownBook | None = None  # the leaves, once the sender has announced them


class BountyIndex:
    """Open bounties and books bound to `relayer`, kept from the contract's events.

    A bounty the index does not know yet (a sender registers it, then sends at once) is looked
    up on the chain directly, within a budget of `lookups_per_second` for the whole node. Past
    the budget the index catches up with the contract's events instead, at most once per
    MISS_SYNC_SECONDS, and what is still missing then is unknown. So a flood of made-up
    bounties costs the chain a bounded number of calls a second, not one per frame.

    Thread-safety: sync() runs under `_sync_lock` (the follower thread, and connection threads
    on a miss); it, lookups and forget() write `_bounties` and `_books` under `_lock`, which
    also guards the lookup budget; readers take single dict reads without it.
    `books_by_hex` (announced books, for the hot path) is written by connection threads with
    one dict assignment and read without a lock: a root always maps to the same OpenBook
    object (book() hands out the one in `_books`), whose `tree` is set once.
    `_expiring` (a heap of what the index holds, by expiry) and `announced_by` (sender -> the
    roots it announced) are written under `_lock`; forget_expired() drops what has expired
    from every table and from disk (the watchdog thread)."""

    def __init__(self, token: ethereum.BountyToken, relayer: str, books_dir: Path | None = None,
                 clock: Callable[[], float] = time.time, from_block: int = 0,
                 lookups_per_second: float = LOOKUPS_PER_SECOND):
        self.token = token
        self.books_dir = books_dir  # announced leaves, kept so a restarted node can still redeem
        self.relayer = relayer
        self.clock = clock
        self._bounties: dict[bytes, tuple[int, str]] = {}  # code hash -> (expiry, sender)
        self._books: dict[bytes, OpenBook] = {}
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._synced_at = float("-inf")  # time.monotonic() when the last sync started
        self._next_block = from_block  # the contract's deploy block: no events before it
        self.miss_syncs = 0  # syncs that unknown bounties caused
        self.lookups = 0  # direct chain lookups of unknown bounties
        self.lookups_per_second = lookups_per_second
        self._budget, self._budget_at = lookups_per_second, time.monotonic()  # a token bucket, under _lock
        self.books_by_hex: dict[str, OpenBook] = {}  # announced books by root hex, for the hot path
        self._expiring: list[tuple[int, bytes]] = []  # heap of (expiry, code hash or root) held above
        self.announced_by: dict[str, set[bytes]] = {}  # book sender's address -> roots it announced

    def sync(self) -> None:
        """Apply events from the blocks not seen yet."""
        with self._sync_lock:
            self._sync()

    def _sync(self) -> None:  # with _sync_lock held
        self._synced_at = time.monotonic()
        latest = self.token.w3.eth.block_number
        if latest < self._next_block:
            return
        topics = {"relayer": self.relayer}
        contract_events = self.token.contract.events
        registered = contract_events.BountyRegistered().get_logs(
            argument_filters=topics, from_block=self._next_block, to_block=latest)
        opened = contract_events.BookOpened().get_logs(
            argument_filters=topics, from_block=self._next_block, to_block=latest)
        with self._lock:
            for event in registered:
                code_hash, expiry = bytes(event["args"]["codeHash"]), event["args"]["expiry"]
                self._bounties[code_hash] = (expiry, event["args"]["sender"])
                heapq.heappush(self._expiring, (expiry, code_hash))
            for event in opened:
                args = event["args"]
                root = bytes(args["root"])
                book = self._books.get(root)
                if book is None:
                    self._books[root] = OpenBook(args["size"], args["expiry"], args["sender"])
                    heapq.heappush(self._expiring, (args["expiry"], root))
        self._next_block = latest + 1

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
                except Exception as exc:  # a flaky RPC must not kill the node
                    log.warning("event sync failed: %s", exc)

        thread = threading.Thread(target=follow, name="bounty-index", daemon=True)
        thread.start()
        return thread

    def single_payer(self, code_hash: bytes, now: float | None = None) -> str | None:
        """The sender of the single bounty behind `code_hash` when it is open, bound to this node
        and not about to expire at `now` (chain time); None otherwise."""
        now = self.clock() if now is None else now
        known = self._bounties.get(code_hash)
        if known is None:
            if self._may_look_up():
                info = self.token.bounty(code_hash)
                if info.state != "open" or info.relayer != self.relayer:
                    return None
                known = (info.expiry, info.sender)
                with self._lock:
                    self._bounties[code_hash] = known
                    heapq.heappush(self._expiring, (info.expiry, code_hash))
            else:
                self.catch_up()
                known = self._bounties.get(code_hash)
                if known is None:
                    return None
        expiry, sender = known
        return sender if expiry > now + EXPIRY_MARGIN else None

    def book(self, root: bytes) -> OpenBook | None:
        """The book bound to this node with that root, None if there is none; with its leaves
        when its sender announced them (also before a restart)."""
        book = self._books.get(root)
        if book is None:
            if self._may_look_up():
                info = self.token.book(root)
                if info.relayer != self.relayer or info.refunded or info.size == 0:
                    return None
                with self._lock:
                    book = self._books.get(root)
                    if book is None:
                        self._books[root] = book = OpenBook(info.size, info.expiry, info.sender)
                        heapq.heappush(self._expiring, (info.expiry, root))
            else:
                self.catch_up()
                book = self._books.get(root)
                if book is None:
                    return None
        if book.tree is None and self.books_dir is not None:
            saved = self.books_dir / f"{root.hex()}.json"
            if saved.exists():
                try:
                    book.tree = KnownBook(root, [bytes.fromhex(x) for x in json.loads(saved.read_text())])
                except ValueError:
                    pass
        return book

    def announced_book(self, root_hex: str) -> OpenBook | None:
        """The open book bound to this node with that root (lower-case hex) whose leaves its
        sender has announced; None otherwise. A hit is one dict read (dm.relay.rules reads
        books_by_hex itself first); a miss catches up with the chain's events."""
        book = self.books_by_hex.get(root_hex)
        if book is None:
            book = self.book(bytes.fromhex(root_hex))
            if book is None or book.tree is None:
                return None
            self.books_by_hex[root_hex] = book
        return book

    def announce_book(self, root: bytes, leaves: list[bytes]) -> OpenBook | None:
        """A sender tells us the leaf hashes of its book, so we can check codes
        and build multiproofs ourselves. Returns None if no such book pays us."""
        book = self.book(root)
        if book is None or len(leaves) != book.size:
            return None
        if book.tree is None:
            book.tree = KnownBook(root, leaves)  # raises ValueError when the leaves do not make the root
            with self._lock:
                self.announced_by.setdefault(book.sender, set()).add(root)
            if self.books_dir is not None:
                self.books_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.books_dir / f"{root.hex()}.tmp"
                tmp.write_text(json.dumps([leaf.hex() for leaf in leaves]))
                os.replace(tmp, self.books_dir / f"{root.hex()}.json")
        return book

    def forget(self, code_hash: bytes) -> None:
        with self._lock:
            self._bounties.pop(code_hash, None)

    def bounty_expiry(self, paid_by: tuple) -> int | None:
        """The chain expiry of a bounty key (dm.wire.bounty_key), None when the index no longer
        holds it (then it has expired, or was redeemed or refunded)."""
        if paid_by[0] == "book":
            book = self.books_by_hex.get(paid_by[1])
            return book.expiry if book is not None else None
        known = self._bounties.get(bytes.fromhex(paid_by[1]))
        return known[0] if known is not None else None

    def open_books_announced(self, sender: str, chain_now: float) -> int:
        """How many books `sender` announced that have not expired by `chain_now`."""
        with self._lock:
            roots = self.announced_by.get(sender, ())
            return sum(1 for root in roots if (book := self._books.get(root)) is not None and book.expiry > chain_now)

    def forget_expired(self, chain_now: float) -> int:
        """Drop every bounty and book that expired before `chain_now`, from memory and its
        leaves from disk: nothing can pay with it any more, and a code for it can no longer be
        redeemed (the contract refuses an expired bounty). Returns how many books were dropped."""
        dropped = []
        with self._lock:
            expiring = self._expiring
            while expiring and expiring[0][0] < chain_now:
                _, key = heapq.heappop(expiring)
                self._bounties.pop(key, None)
                book = self._books.pop(key, None)
                if book is not None:
                    self.books_by_hex.pop(key.hex(), None)
                    roots = self.announced_by.get(book.sender)
                    if roots is not None:
                        roots.discard(key)
                        if not roots:
                            del self.announced_by[book.sender]
                    dropped.append(key)
        if self.books_dir is not None:
            for root in dropped:
                (self.books_dir / f"{root.hex()}.json").unlink(missing_ok=True)
        return len(dropped)


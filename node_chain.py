"""The node's side of the chain: which bounties it may accept, and getting paid.

`BountyIndex` follows BountyToken's events and keeps the open bounties and
books bound to this node, so checking a message costs no RPC round trip in
steady state; a miss falls back to one direct lookup.

`Redeemer` keeps every returned code in an append-only journal on disk until
its redemption is mined, and redeems in batches (`--batch-size`,
`--batch-wait`). After a crash the journal is replayed; the contract skips
codes already paid, so nothing is paid twice.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from eth_utils import keccak

import web3_utils as wu
from bounty_book import KnownBook

log = logging.getLogger("node")
EXPIRY_MARGIN = 30  # seconds a bounty must still have to run when a message is accepted


@dataclass
class OpenBook:
    size: int
    expiry: int
    sender: str
    tree: KnownBook | None = None  # the leaves, once the sender has announced them


class BountyIndex:
    """Open bounties and books bound to `relayer`, kept from the contract's events."""

    def __init__(self, token: wu.BountyToken, relayer: str, books_dir: Path | None = None,
                 clock: Callable[[], float] = time.time):
        self.token = token
        self.books_dir = books_dir  # announced leaves, kept so a restarted node can still redeem
        self.relayer = relayer
        self.clock = clock
        self._bounties: dict[bytes, int] = {}  # code hash -> expiry
        self._books: dict[bytes, OpenBook] = {}
        self._lock = threading.Lock()
        self._next_block = 0
        self.lookups = 0  # direct chain lookups, i.e. index misses
        self.books_by_hex: dict[str, OpenBook] = {}  # announced books by root hex, for the hot path

    def sync(self) -> None:
        """Apply events from the blocks not seen yet."""
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
                self._bounties[bytes(event["args"]["codeHash"])] = event["args"]["expiry"]
            for event in opened:
                args = event["args"]
                root = bytes(args["root"])
                book = self._books.get(root)
                if book is None:
                    self._books[root] = OpenBook(args["size"], args["expiry"], args["sender"])
        self._next_block = latest + 1

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

    def single_is_payable(self, code_hash: bytes) -> bool:
        """Open, bound to this node, and not about to expire."""
        now = self.clock()
        expiry = self._bounties.get(code_hash)
        if expiry is None:
            self.lookups += 1
            info = self.token.bounty(code_hash)
            if info.state != "open" or info.relayer != self.relayer:
                return False
            expiry = info.expiry
            with self._lock:
                self._bounties[code_hash] = expiry
        return expiry > now + EXPIRY_MARGIN

    def book(self, root: bytes) -> OpenBook | None:
        book = self._books.get(root)
        if book is None:
            self.lookups += 1
            info = self.token.book(root)
            if info.relayer != self.relayer or info.refunded or info.size == 0:
                return None
            book = OpenBook(info.size, info.expiry, info.sender)
            with self._lock:
                book = self._books.setdefault(root, book)
        if book.tree is None and self.books_dir is not None:
            saved = self.books_dir / f"{root.hex()}.json"
            if saved.exists():
                try:
                    book.tree = KnownBook(root, [bytes.fromhex(x) for x in json.loads(saved.read_text())])
                except ValueError:
                    pass
        return book

    def is_payable(self, paid_by: tuple) -> bool:
        """paid_by: ("single", code hash hex) or ("book", root hex, leaf index), lower-case hex."""
        if paid_by[0] == "single":
            return self.single_is_payable(bytes.fromhex(paid_by[1]))
        book = self.books_by_hex.get(paid_by[1])  # the hot path: one dict lookup
        if book is None:
            book = self.book(bytes.fromhex(paid_by[1]))
            if book is None or book.tree is None:
                return False
            self.books_by_hex[paid_by[1]] = book
        return self._leaf_is_payable(book, paid_by[2])

    def _leaf_is_payable(self, book: OpenBook, index: int) -> bool:
        return book.tree is not None and index < book.size and book.expiry > self.clock() + EXPIRY_MARGIN

    def announce_book(self, root: bytes, leaves: list[bytes]) -> OpenBook | None:
        """A sender tells us the leaf hashes of its book, so we can check codes
        and build multiproofs ourselves. Returns None if no such book pays us."""
        book = self.book(root)
        if book is None or len(leaves) != book.size:
            return None
        if book.tree is None:
            book.tree = KnownBook(root, leaves)  # raises ValueError when the leaves do not make the root
            if self.books_dir is not None:
                self.books_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.books_dir / f"{root.hex()}.tmp"
                tmp.write_text(json.dumps([leaf.hex() for leaf in leaves]))
                os.replace(tmp, self.books_dir / f"{root.hex()}.json")
        return book

    def forget(self, code_hash: bytes) -> None:
        with self._lock:
            self._bounties.pop(code_hash, None)


@dataclass
class Claim:
    """A code a recipient returned, waiting to be redeemed."""
    msg_id: str
    sender: str
    code: bytes
    book: bytes | None = None
    index: int | None = None

    @property
    def key(self) -> str:
        return f"{self.book.hex()}:{self.index}" if self.book else keccak(self.code).hex()

    def to_json(self) -> dict:
        return {"msg_id": self.msg_id, "sender": self.sender, "code": self.code.hex(),
                "book": self.book.hex() if self.book else None, "index": self.index}

    @classmethod
    def from_json(cls, data: dict) -> "Claim":
        return cls(data["msg_id"], data["sender"], bytes.fromhex(data["code"]),
                   bytes.fromhex(data["book"]) if data.get("book") else None, data.get("index"))


class Journal:
    """Append-only, fsynced: a claim line when a code arrives, a done line once
    its redemption is mined. Compacted to the pending claims at start."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pending = self._replay()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            for claim in self.pending.values():
                handle.write(json.dumps({"op": "claim", **claim.to_json()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self._file = open(path, "a")
        self._lock = threading.Lock()
        self._dirty = False

    def _replay(self) -> dict[str, Claim]:
        pending: dict[str, Claim] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return pending
        for line in lines:
            try:
                entry = json.loads(line)
                if entry["op"] == "claim":
                    claim = Claim.from_json(entry)
                    pending[claim.key] = claim
                elif entry["op"] == "done":
                    for key in entry["keys"]:
                        pending.pop(key, None)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash mid-write
        return pending

    def _append(self, entry: dict, sync: bool = True) -> None:
        with self._lock:
            self._file.write(json.dumps(entry) + "\n")
            self._dirty = True
            if sync:
                self._sync()

    def _sync(self) -> None:  # with self._lock held
        if self._dirty:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._dirty = False

    def sync(self) -> None:
        """Make every line written so far durable (group commit: one fsync per burst)."""
        if self._dirty:
            with self._lock:
                self._sync()

    def add(self, claim: Claim, sync: bool = True) -> None:
        self._append({"op": "claim", **claim.to_json()}, sync)

    def done(self, keys: list[str]) -> None:
        self._append({"op": "done", "keys": keys})

    def close(self) -> None:
        self._file.close()


@dataclass
class Redeemed:
    claims: list[Claim]
    paid_claims: list[Claim]  # the ones the contract actually paid (others were skipped)
    paid: int
    gas_used: int
    tx_hash: str


@dataclass
class _Queue:
    claims: list[Claim] = field(default_factory=list)
    first_at: float | None = None


class Redeemer:
    """Batches claims and redeems them; one thread, so one nonce sequence."""

    def __init__(self, token: wu.BountyToken, signer: wu.Signer, index: BountyIndex, journal: Journal,
                 batch_size: int = 50, batch_wait: float = 1.0,
                 on_redeemed: Callable[[Redeemed], None] = lambda r: None):
        self.token = token
        self.signer = signer
        self.index = index
        self.journal = journal
        self.batch_size = max(1, batch_size)
        self.batch_wait = batch_wait
        self.on_redeemed = on_redeemed
        self._queue = _Queue()
        self._cond = threading.Condition()
        self._stopping = False
        self.earned = 0
        self._thread = threading.Thread(target=self._run, name="redeemer", daemon=True)
        for claim in journal.pending.values():  # what a previous run left unpaid
            self._enqueue(claim)
        if journal.pending:
            log.info("journal: %d code(s) from an earlier run to redeem", len(journal.pending))

    def start(self) -> None:
        self._thread.start()

    def submit(self, claim: Claim, sync: bool = True) -> None:
        # Journaled before it is queued; with sync=False the caller fsyncs the
        # journal itself (once per burst) before it answers anyone.
        self.journal.add(claim, sync)
        with self._cond:
            self._enqueue(claim)
            self._cond.notify()

    def _enqueue(self, claim: Claim) -> None:
        if self._queue.first_at is None:
            self._queue.first_at = time.monotonic()
        self._queue.claims.append(claim)

    def pending(self) -> int:
        with self._cond:
            return len(self._queue.claims)

    def stop(self, flush: bool = True) -> None:
        """Flush what is queued (at shutdown) and stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        elif flush:
            self._flush(self._take())

    def _take(self) -> list[Claim]:
        claims = self._queue.claims
        self._queue = _Queue()
        return claims

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    queue = self._queue
                    due = queue.first_at is not None and (
                        len(queue.claims) >= self.batch_size
                        or time.monotonic() - queue.first_at >= self.batch_wait)
                    if due or self._stopping:
                        break
                    timeout = None if queue.first_at is None else \
                        max(0.0, self.batch_wait - (time.monotonic() - queue.first_at))
                    self._cond.wait(timeout)
                claims = self._take()
                stopping = self._stopping
            if claims:
                self._flush(claims)
            if stopping:
                return

    def _flush(self, claims: list[Claim]) -> None:
        singles = [c for c in claims if c.book is None]
        books: dict[bytes, list[Claim]] = {}
        for claim in claims:
            if claim.book is not None:
                books.setdefault(claim.book, []).append(claim)
        for start in range(0, len(singles), self.batch_size):
            self._redeem(singles[start:start + self.batch_size], None)
        for root, group in books.items():
            self._redeem(group, root)

    def _redeem(self, claims: list[Claim], root: bytes | None) -> None:
        try:
            if root is None:
                receipt = self.token.redeem_batch(self.signer, [c.code for c in claims])
                redeemed = {bytes(e["codeHash"]) for e in self.token.events(receipt, "BountyRedeemed")}
                paid_claims = [c for c in claims if keccak(c.code) in redeemed]
                paid = len(redeemed)
            else:
                book = self.index.book(root)
                if book is None or book.tree is None:
                    raise wu.ChainError(f"book {root.hex()[:12]} is unknown to this node")
                unique = {c.index: c.code for c in claims}
                indices, codes, proof, flags = book.tree.redemption_args(unique)
                receipt = self.token.redeem_book(self.signer, root, indices, codes, proof, flags)
                paid = sum(e["paid"] for e in self.token.events(receipt, "BookRedeemed"))
                # All or nothing is the usual case; otherwise ask which leaves are ours now.
                paid_claims = claims if paid == len(unique) else [
                    c for c in claims if self.token.is_leaf_spent(root, c.index)]
        except (wu.ChainError, OSError, ValueError) as exc:
            # Kept in the journal: the next start (or batch) tries again.
            log.error("redeeming %d code(s) failed: %s", len(claims), exc)
            with self._cond:
                for claim in claims:
                    self._enqueue(claim)
            time.sleep(1)
            return
        self.journal.done([c.key for c in claims])
        for claim in claims:
            if claim.book is None:
                self.index.forget(keccak(claim.code))
        self.earned += paid
        self.on_redeemed(Redeemed(claims, paid_claims, paid, receipt["gasUsed"],
                                  "0x" + receipt["transactionHash"].hex().removeprefix("0x")))

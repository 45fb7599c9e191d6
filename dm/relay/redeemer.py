"""Getting paid: every returned code is kept in an append-only journal on disk
until its redemption is mined, and redeemed in batches (`--batch-size`,
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

from dm.chain import ethereum
from dm.relay.bounties import BountyIndex
from dm.relay.outage import CHAIN

log = logging.getLogger("node")


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
    its redemption is mined. Compacted to the pending claims at start.

    Thread-safety: every write and fsync is under `_lock`. Connection threads append claims
    without syncing and sync once at the end of their burst, before they answer anyone; the
    redeemer thread appends done lines."""

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
    """Batches claims and redeems them; one thread, so one nonce sequence.

    Thread-safety: submit() (connection threads) and the redeemer thread share the queue
    under `_cond`; only the redeemer thread talks to the chain and calls on_redeemed."""

    def __init__(self, token: ethereum.BountyToken, signer: ethereum.Signer, index: BountyIndex, journal: Journal,
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
                    raise ethereum.ChainError(f"book {root.hex()[:12]} is unknown to this node")
                unique = {c.index: c.code for c in claims}
                indices, codes, proof, flags = book.tree.redemption_args(unique)
                receipt = self.token.redeem_book(self.signer, root, indices, codes, proof, flags)
                paid = sum(e["paid"] for e in self.token.events(receipt, "BookRedeemed"))
                # All or nothing is the usual case; otherwise ask which leaves are ours now.
                paid_claims = claims if paid == len(unique) else [
                    c for c in claims if self.token.is_leaf_spent(root, c.index)]
        except (ethereum.ChainError, OSError, ValueError) as exc:
            # Kept in the journal: the next start (or batch) tries again.
            if not CHAIN.failed(exc, "codes to redeem stay in the journal and"):
                log.error("redeeming %d code(s) failed: %s", len(claims), exc)
            with self._cond:
                for claim in claims:
                    self._enqueue(claim)
            time.sleep(1)
            return
        CHAIN.answered()
        self.journal.done([c.key for c in claims])
        for claim in claims:
            if claim.book is None:
                self.index.forget(keccak(claim.code))
        self.earned += paid
        self.on_redeemed(Redeemed(claims, paid_claims, paid, receipt["gasUsed"],
                                  "0x" + receipt["transactionHash"].hex().removeprefix("0x")))

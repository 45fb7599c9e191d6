"""Getting paid, exactly once: every returned code is kept in the journal
(dm.relay.journal) until its redemption is final, and redeemed in batches
(`--batch-size`, `--batch-wait`).

A redemption is final once its transaction is `confirmations` blocks deep (its own block
counts as one) and that block is still on the chain; only then is the code crossed off the
journal and the sender told `paid`. A transaction that disappears (a reorg, a dev chain
restarted from an older state) or waits behind a nonce the chain never reached has its codes
redeemed again, and the local nonce is re-read from the chain. After a crash the journal is
replayed; the contract skips codes already paid, so nothing is paid twice.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from dm.chain.books import keccak  # safe-pysha3: ~10x faster than eth_utils.keccak

from dm.chain import ethereum
from dm.relay import DEV_CONFIRMATIONS, REAL_CONFIRMATIONS, TESTER_CONFIRMATIONS
from dm.relay.bounties import BountyIndex
from dm.relay.journal import Claim, Journal  # noqa: F401  (Claim: the sessions import it from here)
from dm.relay.outage import CHAIN

log = logging.getLogger("node")

POLL_SECONDS = 0.2  # how often receipts of transactions in flight are checked
STALL_SECONDS = 5.0  # a transaction unmined this long, with a nonce the chain has not reached, is sent again
DEV_MINE_AFTER = 1.0  # on a dev chain with no traffic, seconds before an empty block is mined for confirmations


def default_confirmations(w3) -> int:
    chain_id = w3.eth.chain_id
    if chain_id == ethereum.DEV_CHAIN_IDS[1]:
        return TESTER_CONFIRMATIONS
    return DEV_CONFIRMATIONS if chain_id in ethereum.DEV_CHAIN_IDS else REAL_CONFIRMATIONS


@dataclass
class Redeemed:
    claims: list[Claim]
    paid_claims: list[Claim]  # the ones paid to this node (the others were skipped)
    paid: int
    gas_used: int
    tx_hash: str


@dataclass
class _Queue:
    claims: list[Claim] = field(default_factory=list)
    first_at: float | None = None


@dataclass
class InFlight:
    """A redemption sent and not yet final."""
    tx_hash: bytes
    claims: list[Claim]
    root: bytes | None
    nonce: int | None
    sent_at: float


class Redeemer:
    """Batches claims, redeems them, and follows each transaction until it is final; one
    thread, so one nonce sequence.

    Thread-safety: submit() (connection threads) and the redeemer thread share the queue
    under `_cond`; only the redeemer thread talks to the chain, owns `in_flight` and calls
    on_redeemed."""

    def __init__(self, token: ethereum.BountyToken, signer: ethereum.Signer, index: BountyIndex, journal: Journal,
                 batch_size: int = 50, batch_wait: float = 1.0, confirmations: int | None = None,
                 on_redeemed: Callable[[Redeemed], None] = lambda r: None):
        self.token = token
        self.signer = signer
        self.index = index
        self.journal = journal
        self.batch_size = max(1, batch_size)
        self.batch_wait = batch_wait
        self.confirmations = max(1, confirmations if confirmations is not None else default_confirmations(token.w3))
        self.dev_chain = ethereum.is_dev_chain(token.w3)
        self.on_redeemed = on_redeemed
        self._queue = _Queue()
        self._cond = threading.Condition()
        self._stopping = False
        self.earned = 0
        self.in_flight: list[InFlight] = []
        self.resent = 0  # redemptions sent again after their transaction vanished or stalled
        self._head, self._head_since = -1, time.monotonic()
        self._checked_at = 0.0  # time.monotonic() of the last look at the transactions in flight
        self._thread = threading.Thread(target=self._run, name="redeemer", daemon=True)
        for claim in journal.pending.values():  # what a previous run left unpaid or unconfirmed
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
        """Send what is queued (at shutdown) and stop, waiting a little for confirmations.
        Whatever is not final yet stays in the journal for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        elif flush:
            self._send(self._take())
            self._follow(deadline=time.monotonic() + 5)

    def _take(self) -> list[Claim]:
        claims = self._queue.claims
        self._queue = _Queue()
        return claims

    def _run(self) -> None:
        while True:
            with self._cond:
                claims, stopping = self._wait_for_work()
            try:
                if claims:
                    self._send(claims)
                if self.in_flight:
                    self._checked_at = time.monotonic()
                    self._follow(deadline=time.monotonic() + 5 if stopping else None)
            except Exception as exc:  # a flaky RPC must not kill the redeemer: try again shortly
                log.error("redeemer: %s", exc)
                time.sleep(POLL_SECONDS)
            if stopping:
                return

    def _wait_for_work(self) -> tuple[list[Claim], bool]:  # with _cond held
        """(claims due for a batch, stopping), once a batch is due, the node stops, or the
        transactions in flight are due a look (every POLL_SECONDS)."""
        while True:
            queue, now = self._queue, time.monotonic()
            due = queue.first_at is not None and (
                len(queue.claims) >= self.batch_size or now - queue.first_at >= self.batch_wait)
            if due or self._stopping:
                return self._take(), self._stopping
            timeout = None if queue.first_at is None else self.batch_wait - (now - queue.first_at)
            if self.in_flight:
                look_in = POLL_SECONDS - (now - self._checked_at)
                if look_in <= 0:
                    return [], False
                timeout = look_in if timeout is None else min(timeout, look_in)
            self._cond.wait(timeout)

    # --- sending -------------------------------------------------------------------------

    def _send(self, claims: list[Claim]) -> None:
        singles = [c for c in claims if c.book is None]
        books: dict[tuple[str, bytes], list[Claim]] = {}
        for claim in claims:
            if claim.book is not None:
                books.setdefault((claim.payer, claim.book), []).append(claim)
        sent = [self._send_one(singles[start:start + self.batch_size], None, None)
                for start in range(0, len(singles), self.batch_size)]
        sent += [self._send_one(group, payer, root) for (payer, root), group in books.items()]
        if not all(sent):  # one pause a round, not one per failed group: the others' codes went out
            time.sleep(1)

    def _send_one(self, claims: list[Claim], payer: str | None, root: bytes | None) -> bool:
        """Sends one redemption; False when it failed (its claims are queued again)."""
        try:
            if root is None:
                call_hash = self.token.redeem_batch(self.signer, [c.payer for c in claims], [c.code for c in claims],
                                                    wait=False)
            else:
                book = self.index.book(payer, root)
                if (book is None or book.tree is None) and self._gone(payer, root):
                    log.warning("dropped %d code(s) of book %s of %s: the chain holds no such open book bound to this "
                                "node any more (it expired while they waited, a rollback dropped it, or it was "
                                "refunded); they can never be redeemed",
                                len(claims), root.hex()[:12], payer)
                    self.journal.done([c.key for c in claims])
                    return True
                if book is None or book.tree is None:
                    raise ethereum.ChainError(f"book {root.hex()[:12]} of {payer} is unknown to this node")
                unique = {c.index: c.code for c in claims}
                indices, codes, proof, flags = book.tree.redemption_args(unique)
                call_hash = self.token.redeem_book(self.signer, payer, root, indices, codes, proof, flags, wait=False)
        except (ethereum.ChainError, OSError, ValueError) as exc:
            # Kept in the journal: the next batch (or start) tries again.
            if not CHAIN.failed(exc, "codes to redeem stay in the journal and"):
                log.error("redeeming %d code(s) failed: %s", len(claims), exc)
            self._requeue(claims)
            return False
        CHAIN.answered()
        self.in_flight.append(InFlight(call_hash, claims, root, self.signer.last_nonce, time.monotonic()))
        return True

    def _gone(self, payer: str, root: bytes) -> bool:
        """Whether the chain itself (not the index, which may just not have looked yet) says the
        book can never pay this node: none of that sender with that root, refunded, bound to
        another relayer, or expired (redeemBook pays nothing after expiry; the watchdog forgets
        an expired book, leaves and all, so its codes could not even be proved)."""
        info = self.token.book(payer, root)
        return info.size == 0 or info.refunded or info.relayer != self.signer.address or \
            info.expiry < self.token.w3.eth.get_block("latest")["timestamp"]

    def _requeue(self, claims: list[Claim]) -> None:
        with self._cond:
            for claim in claims:
                self._enqueue(claim)

    # --- following transactions until they are final -----------------------------------------

    def _follow(self, deadline: float | None = None) -> None:
        """Look at every transaction in flight once (until `deadline`, if given, keep looking)."""
        while True:
            self._check_in_flight()
            if not self.in_flight or deadline is None or time.monotonic() > deadline:
                return
            time.sleep(POLL_SECONDS)

    def _check_in_flight(self) -> None:
        w3 = self.token.w3
        latest = w3.eth.block_number
        now = time.monotonic()
        if latest != self._head:
            self._head, self._head_since = latest, now
        lost: list[InFlight] = []
        still: list[InFlight] = []
        chain_nonce = None
        for sent in self.in_flight:
            receipt = _receipt(w3, sent.tx_hash)
            if receipt is None:
                if _transaction(w3, sent.tx_hash) is None:
                    log.warning("redemption %s vanished from the chain; redeeming its %d code(s) again",
                                sent.tx_hash.hex(), len(sent.claims))
                    lost.append(sent)
                    continue
                if now - sent.sent_at > STALL_SECONDS and sent.nonce is not None:
                    if chain_nonce is None:
                        chain_nonce = w3.eth.get_transaction_count(self.signer.address, "latest")
                    if sent.nonce > chain_nonce:  # waits behind a nonce the chain never reached
                        log.warning("redemption %s has nonce %d but the chain is at %d; sending it again",
                                    sent.tx_hash.hex(), sent.nonce, chain_nonce)
                        lost.append(sent)
                        continue
                still.append(sent)
                continue
            depth = latest - receipt["blockNumber"] + 1
            if depth < self.confirmations:
                still.append(sent)
                continue
            block = w3.eth.get_block(receipt["blockNumber"])
            if bytes(block["hash"]) != bytes(receipt["blockHash"]):
                still.append(sent)  # reorganised under us: the receipt will move with it
                continue
            self._final(sent, receipt)
        if lost:
            # Everything after a lost transaction is suspect too: its nonce is past the gap.
            first_lost = min((s.nonce for s in lost if s.nonce is not None), default=None)
            if first_lost is not None:
                behind = [s for s in still if s.nonce is not None and s.nonce > first_lost
                          and _receipt(w3, s.tx_hash) is None]
                lost += behind
                still = [s for s in still if s not in behind]
            self.signer.resync()
            self.resent += len(lost)
            for sent in lost:
                self._requeue(sent.claims)
        self.in_flight = still
        if still and self.dev_chain and self.confirmations > 1 and now - self._head_since > DEV_MINE_AFTER:
            # A dev chain mines only when a transaction arrives: with no traffic, a redemption
            # would never get deep enough. An empty block a second moves it on.
            try:
                w3.provider.make_request("evm_mine", [])
            except Exception as exc:
                log.debug("evm_mine: %s", exc)
            self._head_since = now

    def _final(self, sent: InFlight, receipt) -> None:
        claims = sent.claims
        if receipt["status"] != 1:
            log.error("redemption %s failed on chain; its %d code(s) stay in the journal for the next start",
                      sent.tx_hash.hex(), len(claims))
            return
        if sent.root is None:
            redeemed = {(e["sender"], bytes(e["codeHash"])) for e in self.token.events(receipt, "BountyRedeemed")}
            paid = len(redeemed)
            # A code skipped here may have been paid by an earlier transaction of ours (sent
            # again after a rollback or a restart): the chain says whose it is now.
            paid_claims = [c for c in claims if (c.payer, keccak(c.code)) in redeemed
                           or self._paid_to_us(self.token.bounty(c.payer, keccak(c.code)))]
        else:
            paid = sum(e["paid"] for e in self.token.events(receipt, "BookRedeemed"))
            unique = {c.index for c in claims}
            paid_claims = claims if paid == len(unique) else [
                c for c in claims if self.token.is_leaf_spent(c.payer, sent.root, c.index)]
        self.journal.done([c.key for c in claims])
        for claim in claims:
            if claim.book is None:
                self.index.forget(claim.payer, keccak(claim.code))
        self.earned += paid
        self.on_redeemed(Redeemed(claims, paid_claims, paid, receipt["gasUsed"],
                                  "0x" + bytes(receipt["transactionHash"]).hex()))

    def _paid_to_us(self, info: ethereum.BountyInfo) -> bool:
        return info.state == "redeemed" and info.relayer == self.signer.address


def _receipt(w3, tx_hash: bytes):
    try:
        return w3.eth.get_transaction_receipt(tx_hash)
    except Exception as exc:  # web3 raises TransactionNotFound for "not mined (yet)"
        if type(exc).__name__ == "TransactionNotFound":
            return None
        raise


def _transaction(w3, tx_hash: bytes):
    try:
        return w3.eth.get_transaction(tx_hash)
    except Exception as exc:
        if type(exc).__name__ == "TransactionNotFound":
            return None
        raise

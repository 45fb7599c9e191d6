"""The delivery ledger: which bounties carried a message, and which deliveries wait for their code.

A delivery is a plain tuple, `Delivery = (msg_id, sender, recipient, paid_by, delivered_at)`.
Its paid_by is the bounty key (dm.wire.bounty_key) with the paying account appended
(`paying`): ("book", root hex, index, payer) or ("single", code hash hex, payer). Bounties are
keyed by their sender on chain, so one hash (or root) registered by two accounts is two
bounties, and the one a copier sends on first must not take the owner's. Plain tuples on
purpose: millions can be pending, and CPython's collector stops tracking tuples of plain values
but rescans every class instance on each full collection, which doubled the relay's cost per
message.

Everything here is bounded: a delivery leaves `pending` when its code comes back or its claim
timeout passes, and its bounty leaves `used` once the bounty (or its book) has expired on chain,
after which no message can carry it anyway. A claim is remembered in `claimed` (so that a
recipient whose `release` was lost can claim again) for the claim timeout after the claim, then
freed by the same watchdog sweep. `max_unclaimed` caps how many deliveries one user may have
waiting for their code, as sender and as recipient (issue 10 part 2).
"""
from __future__ import annotations

import collections
import heapq
import threading
from typing import Callable

from dm.wire import ProtocolError

Delivery = tuple
# A claim kept for a re-claim: (delivery, keccak256 of its code, when it was claimed on the node's clock).
Claimed = tuple
SETTLED = ("settled",)  # in `used`, restored from a delivery log that kept no msg_id: the bounty carried a message


# How long a bounty key (dm.wire.bounty_key) is without the payer: a delivery log written before
# the payer was recorded holds such keys (dm.relay.journal.restore completes them).
BOUNTY_KEY_LENGTH = {"book": 3, "single": 2}


def paying(paid_by: tuple, payer: str) -> tuple:
    """A delivery's paid_by: the bounty key and the account whose bounty it is."""
    return paid_by + (payer,)


class AlreadyDelivered(ProtocolError):
    """A resend of a msg_id with the very bounty that already carried it: the node answers with
    the original outcome (a `delivered` receipt) and delivers nothing again."""

    def __init__(self, msg_id: str):
        super().__init__("duplicate", "already delivered", ref=msg_id)


# A recipient of many users, or a sender to many, gets its deliveries' codes back within
# seconds; 1,000 waiting at once is minutes of honest traffic, and bounds what a colluding pair
# (or a recipient that never claims) gets without paying to 1,000 messages.
MAX_UNCLAIMED = 1000


class DeliveryLedger:
    """Reservations (bounty -> delivery, msg_id -> delivery), claims, expiry and the per-user
    counts of deliveries waiting for their code.

    Thread-safety: connection threads reserve, release and claim without a lock. Every insert
    is a dict.setdefault and every removal checks that the entry is still the one it means,
    each atomic under the GIL, so two threads racing for one bounty or one msg_id see exactly
    one winner. `expiring` is appended by connection threads (deque.append is atomic) and
    consumed only by forget_settled(), which only the watchdog thread calls; so is
    `_used_until`. `unjournaled` is appended by connection threads and consumed only by the
    delivery log's writer thread (dm.relay.journal.DeliveryLog, whose `feed` it is).
    `claimed` gets its entries from connection threads (remember_claim: a dict store and a
    deque.append, each atomic) and loses them only in forget_settled(); a reader sees a
    record whole or not at all.
    restore() runs before any thread. The waiting counts (`sent_waiting`, `received_waiting`)
    are written only under `_count_lock` (once per burst, per claim, per watchdog tick), and read without it
    by the burst loop: a read sees the count before or after a change, never a torn one.
    """

    def __init__(self, claim_timeout: float, max_unclaimed: int = MAX_UNCLAIMED,
                 bounty_expiry: Callable[[tuple], float | None] = lambda paid_by: None):
        self.claim_timeout = claim_timeout
        self.max_unclaimed = max_unclaimed
        self.bounty_expiry = bounty_expiry  # paid_by -> its chain expiry, None when unknown
        self.pending: dict[str, Delivery] = {}  # msg_id -> delivery awaiting its code
        # bounty -> the delivery it paid for, or just its msg_id once that is no longer pending
        self.used: dict[tuple, Delivery | str] = {}
        self.expiring: collections.deque[Delivery] = collections.deque()  # deliveries, oldest first
        # Each burst's deliveries, for dm.relay.journal's writer thread to make durable.
        self.unjournaled: collections.deque[tuple] = collections.deque()
        self.sent_waiting: dict[str, int] = {}  # sender -> its deliveries waiting for a code
        self.received_waiting: dict[str, int] = {}  # recipient -> the same
        self._count_lock = threading.Lock()
        self._used_until: list[tuple[float, tuple]] = []  # heap of (bounty expiry, bounty) no longer pending
        # (msg_id, recipient) -> its claim, for the claim timeout after it: another user's message
        # under the same msg_id must not replace it
        self.claimed: dict[tuple[str, str], Claimed] = {}
        self._claimed_order: collections.deque[Claimed] = collections.deque()  # the same, oldest claim first

    def reserve(self, delivery: Delivery) -> None:
        """Take the delivery's bounty and msg_id, or refuse if either is taken. A bounty already
        taken by this same msg_id (and recipient) is a client's resend: AlreadyDelivered."""
        msg_id, paid_by = delivery[0], delivery[3]
        if self.used.setdefault(paid_by, delivery) is not delivery:  # (the hot path is unchanged)
            taken = self.used.get(paid_by)
            if taken == msg_id or (type(taken) is tuple and taken[0] == msg_id and taken[2] == delivery[2]):
                raise AlreadyDelivered(msg_id)
            raise ProtocolError("unpaid", "that bounty already paid for another message", ref=msg_id)
        # A msg_id its recipient claimed is kept for a re-claim (claimed_by): not for another message to them.
        if (msg_id, delivery[2]) in self.claimed or self.pending.setdefault(msg_id, delivery) is not delivery:
            self.used.pop(paid_by, None)
            raise ProtocolError("bad_field", "msg_id is already in use", ref=msg_id)

    def release(self, delivery: Delivery) -> None:
        """Undo a reservation whose message was not delivered after all."""
        msg_id, paid_by = delivery[0], delivery[3]
        if self.used.get(paid_by) is delivery:
            self.used.pop(paid_by, None)
        if self.pending.get(msg_id) is delivery:
            self.pending.pop(msg_id, None)

    def count_sent(self, sender: str, change: int) -> None:
        """A delivery routed to another node counts as waiting for its sender from the moment it
        goes (+1), so that sends racing ahead of that node's answer see it; -1 if it was not
        delivered after all (delivered(..., sender_counted=True) when it was)."""
        with self._count_lock:
            left = self.sent_waiting.get(sender, 0) + change
            if left > 0:
                self.sent_waiting[sender] = left
            else:
                self.sent_waiting.pop(sender, None)

    def delivered(self, deliveries: list[Delivery], per_recipient: dict[str, int] | None = None,
                  sender_counted: bool = False) -> None:
        """These reservations, all from one sender, reached their recipients: their claim clock
        runs, and they count as waiting. `per_recipient` (name -> how many) spares a count;
        `sender_counted`: count_sent() counted them for their sender already."""
        if not deliveries:
            return
        self.expiring.extend(deliveries)
        self.unjournaled.append(tuple(deliveries))  # for the journal's writer thread: one copy per burst
        if per_recipient is None:
            per_recipient = collections.Counter(d[2] for d in deliveries)
        sender, sent, received = deliveries[0][1], self.sent_waiting, self.received_waiting
        with self._count_lock:
            if not sender_counted:
                sent[sender] = sent.get(sender, 0) + len(deliveries)
            for recipient, count in per_recipient.items():
                received[recipient] = received.get(recipient, 0) + count

    def _drop_waiting(self, sender: str, recipient: str) -> None:  # with _count_lock held
        for counts, name in ((self.sent_waiting, sender), (self.received_waiting, recipient)):
            left = counts.get(name, 0) - 1
            if left > 0:
                counts[name] = left
            else:
                counts.pop(name, None)  # a user with nothing waiting costs no entry

    def restore(self, pending: list[Delivery], used: list, claimed: list[Claimed] = ()) -> None:
        """What a previous run left (dm.relay.journal.restore): deliveries still waiting for
        their code, (bounty, msg_id or None) of those that carried a message (kept for this run:
        the journal's restore already dropped those that can no longer pay), and claims still in their
        re-claim window, oldest first. Before the node serves anyone."""
        for record in claimed:
            self.claimed[record[0][0], record[0][2]] = record
            self._claimed_order.append(record)
        for paid_by, msg_id in used:  # as forget_settled() leaves them: the msg_id answers a resend
            self.used[paid_by] = SETTLED if msg_id is None else msg_id
        for delivery in sorted(pending, key=lambda d: d[4]):
            self.used[delivery[3]] = delivery
            self.pending[delivery[0]] = delivery
            self.expiring.append(delivery)
        with self._count_lock:
            for delivery in pending:
                self.sent_waiting[delivery[1]] = self.sent_waiting.get(delivery[1], 0) + 1
                self.received_waiting[delivery[2]] = self.received_waiting.get(delivery[2], 0) + 1

    def awaiting(self, msg_id: str, recipient: str) -> Delivery | None:
        """The delivery to `recipient` that waits for this code, if any."""
        delivery = self.pending.get(msg_id)
        return delivery if delivery is not None and delivery[2] == recipient else None

    def settle(self, delivery: Delivery) -> bool:
        """Its code came back: True for the one caller that settles it."""
        if self.pending.get(delivery[0]) is not delivery:
            return False
        if self.pending.pop(delivery[0], None) is not delivery:
            return False
        with self._count_lock:
            self._drop_waiting(delivery[1], delivery[2])
        return True

    def remember_claim(self, delivery: Delivery, code_hash: bytes, now: float) -> None:
        """Its code came back and is journaled: a repeated claim by its recipient with the same
        code may have the key again (claimed_by), for the claim timeout from `now`. Called after
        the journal line is written, so a re-claim's fsync (at the end of its burst) covers it."""
        record = (delivery, code_hash, now)
        self.claimed[delivery[0], delivery[2]] = record
        self._claimed_order.append(record)

    def claimed_by(self, msg_id: str, recipient: str) -> Claimed | None:
        """The claim of this message by `recipient`, while it is remembered."""
        return self.claimed.get((msg_id, recipient))

    def forget_settled(self, now: float, chain_now: float | None = None) -> None:
        """Drop deliveries whose code came back, and those that waited longer than the claim
        timeout (their bounty stays used until it expires on chain). Oldest first, so the queue
        stays short while recipients answer. Drop the claims older than the claim timeout, and
        then the used bounties that have expired by `chain_now`. The watchdog thread only."""
        claimed, order, oldest = self.claimed, self._claimed_order, now - self.claim_timeout
        while order and order[0][2] < oldest:
            record = order.popleft()
            key = (record[0][0], record[0][2])
            kept = claimed.pop(key, None)
            if kept is not None and kept is not record:  # a newer claim of a reused msg_id: keep it
                claimed.setdefault(key, kept)
        expiring, pending, used = self.expiring, self.pending, self.used
        used_until, expiry_of = self._used_until, self.bounty_expiry
        while expiring:
            msg_id, sender, recipient, paid_by, delivered_at = delivery = expiring[0]
            if pending.get(msg_id) is delivery:
                if now - delivered_at <= self.claim_timeout:
                    break
                if pending.pop(msg_id, None) is delivery:
                    with self._count_lock:
                        self._drop_waiting(sender, recipient)
            if used.get(paid_by) is delivery:
                used[paid_by] = msg_id  # keep the bounty used (and resends answered), free the rest
                expiry = expiry_of(paid_by)
                # unknown expiry (a book forgotten already): it expired, drop at the next sweep
                heapq.heappush(used_until, (expiry if expiry is not None else float("-inf"), paid_by))
            expiring.popleft()
        if chain_now is not None:
            while used_until and used_until[0][0] < chain_now:
                _, paid_by = heapq.heappop(used_until)
                if type(used.get(paid_by)) is str:  # an expired bounty pays for nothing: no need to remember it
                    del used[paid_by]

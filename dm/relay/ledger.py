"""The delivery ledger: which bounties carried a message, and which deliveries wait for their code.

A delivery is a plain tuple, `Delivery = (msg_id, sender, recipient, paid_by, delivered_at)`,
with paid_by from dm.wire.bounty_key. Plain tuples on purpose: millions can be pending, and
CPython's collector stops tracking tuples of plain values but rescans every class instance on
each full collection, which doubled the relay's cost per message.
"""
from __future__ import annotations

import collections

from dm.wire import ProtocolError

Delivery = tuple
SETTLED = ("settled",)  # in `used`, restored from the delivery log: the bounty carried a message, msg_id unknown


class AlreadyDelivered(ProtocolError):
    """A resend of a msg_id with the very bounty that already carried it: the node answers with
    the original outcome (a `delivered` receipt) and delivers nothing again."""

    def __init__(self, msg_id: str):
        super().__init__("duplicate", "already delivered", ref=msg_id)


class DeliveryLedger:
    """Reservations (bounty -> delivery, msg_id -> delivery), claims and expiry.

    Thread-safety: connection threads reserve, release and claim without a lock. Every insert
    is a dict.setdefault and every removal checks that the entry is still the one it means,
    each atomic under the GIL, so two threads racing for one bounty or one msg_id see exactly
    one winner. `expiring` is appended by connection threads (deque.append is atomic) and
    consumed only by forget_settled(), which only the watchdog thread calls. `unjournaled` is
    appended by connection threads and consumed only by the delivery log's writer thread
    (dm.relay.journal.DeliveryLog, whose `feed` it is). restore() runs before any thread.
    """

    def __init__(self, claim_timeout: float):
        self.claim_timeout = claim_timeout
        self.pending: dict[str, Delivery] = {}  # msg_id -> delivery awaiting its code
        # bounty -> the delivery it paid for, or just its msg_id once that is no longer pending
        self.used: dict[tuple, Delivery | str] = {}
        self.expiring: collections.deque[Delivery] = collections.deque()  # deliveries, oldest first
        # Each burst's deliveries, for dm.relay.journal's writer thread to make durable.
        self.unjournaled: collections.deque[tuple] = collections.deque()

    def reserve(self, delivery: Delivery) -> None:
        """Take the delivery's bounty and msg_id, or refuse if either is taken. A bounty already
        taken by this same msg_id (and recipient) is a client's resend: AlreadyDelivered."""
        msg_id, paid_by = delivery[0], delivery[3]
        if self.used.setdefault(paid_by, delivery) is not delivery:  # (the hot path is unchanged)
            taken = self.used.get(paid_by)
            if taken == msg_id or (type(taken) is tuple and taken[0] == msg_id and taken[2] == delivery[2]):
                raise AlreadyDelivered(msg_id)
            raise ProtocolError("unpaid", "that bounty already paid for another message", ref=msg_id)
        if self.pending.setdefault(msg_id, delivery) is not delivery:
            self.used.pop(paid_by, None)
            raise ProtocolError("bad_field", "msg_id is already in use", ref=msg_id)

    def release(self, delivery: Delivery) -> None:
        """Undo a reservation whose message was not delivered after all."""
        msg_id, paid_by = delivery[0], delivery[3]
        if self.used.get(paid_by) is delivery:
            self.used.pop(paid_by, None)
        if self.pending.get(msg_id) is delivery:
            self.pending.pop(msg_id, None)

    def delivered(self, deliveries: list[Delivery]) -> None:
        """These reservations reached their recipients: their claim clock runs, and the
        journal's writer thread records them (one tuple copy and one append per burst)."""
        self.expiring.extend(deliveries)
        self.unjournaled.append(tuple(deliveries))

    def restore(self, pending: list[Delivery], used: list) -> None:
        """What a previous run left (dm.relay.journal.restore): deliveries still waiting for
        their code, and bounties that carried a message. Before the node serves anyone."""
        for paid_by in used:
            self.used[paid_by] = SETTLED
        for delivery in sorted(pending, key=lambda d: d[4]):
            self.used[delivery[3]] = delivery
            self.pending[delivery[0]] = delivery
            self.expiring.append(delivery)

    def awaiting(self, msg_id: str, recipient: str) -> Delivery | None:
        """The delivery to `recipient` that waits for this code, if any."""
        delivery = self.pending.get(msg_id)
        return delivery if delivery is not None and delivery[2] == recipient else None

    def settle(self, delivery: Delivery) -> bool:
        """Its code came back: True for the one caller that settles it."""
        if self.pending.get(delivery[0]) is not delivery:
            return False
        return self.pending.pop(delivery[0], None) is delivery

    def forget_settled(self, now: float) -> None:
        """Drop deliveries whose code came back, and those that waited longer than the claim
        timeout (their bounty stays used). Oldest first, so the queue stays short while
        recipients answer. The watchdog thread only."""
        expiring, pending, used = self.expiring, self.pending, self.used
        while expiring:
            msg_id, _, _, paid_by, delivered_at = delivery = expiring[0]
            if pending.get(msg_id) is delivery:
                if now - delivered_at <= self.claim_timeout:
                    break
                pending.pop(msg_id, None)
            if used.get(paid_by) is delivery:
                used[paid_by] = msg_id  # keep the bounty used (and resends answered), free the rest
            expiring.popleft()

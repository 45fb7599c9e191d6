"""Deliveries between nodes: one NATS subject per connected user.

A node subscribes to `dm.u.<name in hex>` while that user is connected to it. A send whose
recipient is not connected here becomes a NATS request on that subject; the recipient's node
writes the `deliver` to its client and answers "delivered". NATS answers "no responders" at
once when no node has the user: the sender gets the usual `offline` receipt.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import zlib

from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

from dm import wire
from dm.relay.session import receipt
from dm.wire import ProtocolError

log = logging.getLogger("node")
_FRAME_LENGTH = wire.HEADER.pack


WRITER_THREADS = 4  # socket writes for cross-node traffic; a user's writes always go to the same one
# A delivery reaching the recipient's node later than this before the sender's node stops waiting
# (Dm-Deadline, wall time) is not made: the answer would come too late, the sender be told offline
# and its bounty released. This needs the nodes' clocks to agree (NTP keeps them within ms).
DEADLINE_MARGIN = 0.1
# The recipient's node's answer when the recipient has --max-unclaimed deliveries waiting.
UNCLAIMED_LIMIT = "unclaimed_limit"


class Writers:
    """A few threads that run blocking work (socket writes, ledger updates) in order per key.

    Thread-safety: submit() from any thread puts on a SimpleQueue (thread-safe); each queue has
    exactly one consumer thread. crc32 (not hash()) picks the shard, so the choice is stable."""

    def __init__(self, count: int):
        self._queues = [queue.SimpleQueue() for _ in range(count)]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"cluster-writer-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: str, function, *args) -> None:
        self._queues[zlib.crc32(key.encode()) % len(self._queues)].put((function, args))

    @staticmethod
    def _run(work: queue.SimpleQueue) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            function, args = item
            try:
                function(*args)
            except Exception:  # one failed write must not end the writer
                log.exception("cluster: a write failed")

    def stop(self) -> None:
        for work in self._queues:
            work.put(None)
        for thread in self._threads:
            thread.join(timeout=5)


def user_subject(name: str) -> str:
    """Names may hold '.', which NATS reads as a token separator: subjects carry them in hex."""
    return "dm.u." + name.encode().hex()


class Router:
    """Subscriptions for the users connected here, and requests for the users who are not.

    Thread-safety: `_subscriptions` (name -> NATS subscription) is touched only on the bridge's
    loop thread. route() is called by connection threads and only hands a coroutine to the loop;
    `_in_flight` is a semaphore (its own lock) taken there and released on the loop.
    Writes to client sockets and ledger updates run on `writers` (threads sharded by user name,
    so each user's deliveries and receipts keep their order), never on the loop, so one slow
    client cannot stall the loop."""

    def __init__(self, bridge, node, node_id: str, request_timeout: float, max_in_flight: int):
        self.bridge, self.node, self.node_id, self.request_timeout = bridge, node, node_id, request_timeout
        self._in_flight = threading.BoundedSemaphore(max_in_flight)  # unanswered cross-node deliveries
        self._subscriptions: dict[str, object] = {}
        self.writers = Writers(WRITER_THREADS)
        self.forwarded = 0  # cross-node deliveries answered "delivered" (loop thread only)

    # --- the recipient's node -----------------------------------------------------------

    async def subscribe(self, name: str) -> None:
        nc = self.bridge.nc
        subject = user_subject(name)
        # Whoever still has this user elsewhere lets that session go (the user moved here).
        await nc.publish(subject, b"", headers={"Dm-Kind": "kick", "Dm-Origin": self.node_id})
        old = self._subscriptions.pop(name, None)
        if old is not None:
            await old.unsubscribe()
        self._subscriptions[name] = await nc.subscribe(subject, cb=self._on_message)
        await nc.flush()

    async def unsubscribe(self, name: str) -> None:
        subscription = self._subscriptions.pop(name, None)
        if subscription is not None:
            await subscription.unsubscribe()

    async def _on_message(self, msg) -> None:
        """On the loop: hand the delivery to the user's writer thread and return at once, so the
        next message (for this user or another) does not wait for a socket write."""
        headers = msg.headers or {}
        name = bytes.fromhex(msg.subject.rsplit(".", 1)[1]).decode()
        if headers.get("Dm-Kind") == "kick":
            if headers.get("Dm-Origin") != self.node_id:
                self.writers.submit(name, self._kick, name)
            return
        self.writers.submit(name, self._deliver_and_answer, name, headers, msg.data, msg.reply)

    def _deliver_and_answer(self, name: str, headers: dict, body: bytes, reply: str) -> None:
        try:
            status = self._deliver_here(name, headers, body)
        except Exception:  # a bug costs this delivery, never the writer
            log.exception("cluster: delivering to %s failed", name)
            status = "offline"
        if reply:
            self.bridge.loop.call_soon_threadsafe(self._publish_soon, reply, status.encode())

    def _publish_soon(self, subject: str, data: bytes) -> None:
        self.bridge.loop.create_task(self.bridge.nc.publish(subject, data))

    def _kick(self, name: str) -> None:
        session = self.node.online.get(name)
        if session is not None:
            session.transport.abort(wire.error("name_in_use", f"{name} connected again on another node"))

    def _deliver_here(self, name: str, headers: dict, body: bytes) -> str:
        """Write the deliver to the local client and hold the delivery in this node's ledger
        until its code comes back (the pool). paid_by records the sender's node and bounty."""
        try:
            late = time.time() - float(headers.get("Dm-Deadline", "inf"))
        except ValueError:
            late = 0.0
        if late > -DEADLINE_MARGIN:  # e.g. this node was stalled: its sender's node has given up
            log.warning("cluster: dropped a delivery to %s that came %.2fs %s its sender's node stopped waiting "
                        "(--cluster-timeout); if this repeats while no node is stalled, check the nodes' clocks",
                        name, abs(late), "after" if late >= 0 else "before")
            return "offline"
        session = self.node.online.get(name)
        if session is None or session.transport.closed:
            return "offline"
        ledger = self.node.ledger
        if ledger.received_waiting.get(name, 0) >= ledger.max_unclaimed:  # as for a sender on this node
            return UNCLAIMED_LIMIT
        pay = json.loads(headers["Dm-Pay"])
        paid_by = ("remote", headers["Dm-Origin"], *pay)
        delivery = (headers["Dm-Msg"], headers["Dm-From"], name, paid_by, self.node.server.clock())
        try:
            ledger.reserve(delivery)
        except ProtocolError:  # the same msg_id is already waiting here
            return "offline"
        if not session.transport.send_bytes(_FRAME_LENGTH(len(body)) + body):
            ledger.release(delivery)
            return "offline"
        ledger.delivered([delivery])
        return "delivered"

    # --- the sender's node --------------------------------------------------------------

    def route(self, transport, delivery: tuple, body: bytes, pay: list) -> None:
        """From a connection thread: relay a reserved delivery to another node; the receipt
        follows when that node answers. `pay` is the bounty as the recipient's node needs it
        (docs/PROTOCOL.md §11.1). Waits while `max_in_flight` deliveries are unanswered (the
        sender's reads stop, as when a local recipient reads slowly); past the timeout the
        message counts as offline."""
        if not self._in_flight.acquire(timeout=self.request_timeout):
            self._answer_sender(transport, delivery, "offline")
            return
        self.bridge.loop.call_soon_threadsafe(self._start_forward, transport, delivery, body, pay)

    def _start_forward(self, transport, delivery, body, pay) -> None:
        self.bridge.loop.create_task(self._forward(transport, delivery, body, pay))

    async def _forward(self, transport, delivery: tuple, body: bytes, pay: list) -> None:
        try:
            status = await self._request(delivery, body, pay)
        finally:
            self._in_flight.release()
        if status == "delivered":
            self.forwarded += 1
        self.writers.submit(delivery[1], self._answer_sender, transport, delivery, status)

    async def _request(self, delivery: tuple, body: bytes, pay: list) -> str:
        msg_id, sender, to, _, _ = delivery
        headers = {"Dm-Msg": msg_id, "Dm-From": sender, "Dm-Origin": self.node_id, "Dm-Pay": json.dumps(pay),
                   "Dm-Deadline": f"{time.time() + self.request_timeout:.3f}"}
        try:
            reply = await self.bridge.nc.request(user_subject(to), body, timeout=self.request_timeout,
                                                 headers=headers)
            status = reply.data.decode(errors="replace")
            if status not in ("delivered", UNCLAIMED_LIMIT):
                status = "offline"
        except NoRespondersError:
            status = "offline"
        except NatsTimeout:
            log.warning("cluster: the node of %s did not answer within %gs; told the sender offline",
                        to, self.request_timeout)
            status = "offline"
        except Exception as exc:  # NATS is gone for now: the sender may try again
            log.warning("cluster: could not relay to %s: %s", to, exc)
            status = "offline"
        return status

    def _answer_sender(self, transport, delivery: tuple, status: str) -> None:
        ledger = self.node.ledger
        if status == "delivered":
            ledger.delivered([delivery], sender_counted=True)
            transport.send_bytes(receipt(delivery[0], status))
            return
        ledger.release(delivery)
        ledger.count_sent(delivery[1], -1)
        if status == UNCLAIMED_LIMIT:  # the recipient's node: they have --max-unclaimed waiting
            transport.send(wire.error("unclaimed_limit", f"{delivery[2]} has too many messages waiting for their "
                                      "codes (its node's --max-unclaimed): send again once codes come back, or "
                                      "after the claim timeout", ref=delivery[0]))
        else:
            transport.send_bytes(receipt(delivery[0], "offline"))

"""Codes returned at one node for a message another node relayed, forwarded exactly once.

The sender paid its own node (its book's relayer), so only that node can redeem the code. The
recipient's node checks the code against the bounty (the sender's node sent the leaf hash
along with the message), then publishes it to the JetStream stream DM_CLAIMS on
`dm.claims.<sender's node id>`, with `Nats-Msg-Id` set so that a retried publish is stored
once. The sender's node reads its subject through a durable consumer and acknowledges a code
only after its redeemer journaled it (fsynced). So a code survives the restart of either node
or of one NATS server: unacknowledged, it is delivered again, and the journal key plus the
contract's spent-leaf check keep the payment to one.

Known limit: between the recipient's claim and JetStream's acknowledgement the code is only in
the recipient node's memory (milliseconds); a crash of that node in that window loses it,
exactly as a local claim not yet fsynced would be.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os

from eth_utils import keccak
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from dm.chain.books import leaf_hash
from dm.relay.redeemer import Claim
from dm.wire import ProtocolError

log = logging.getLogger("node")
STREAM = "DM_CLAIMS"
PUBLISH_ATTEMPTS = 5  # tries to store a code in the stream before the recipient is asked to claim again
SEEN_KEYS = 100_000  # claim keys remembered per run, so a redelivered code is not queued twice
DEDUPE_WINDOW = 3600  # seconds JetStream drops a second publish of the same claim
# Tests only: seconds to hold every forwarded code before storing it, to SIGKILL a node in that window.
TEST_HOLD = float(os.environ.get("DM_TEST_HOLD_FORWARD", "0") or 0)


def claims_subject(node_id: str) -> str:
    return f"dm.claims.{node_id}"


def code_matches(paid_by: tuple, code: bytes) -> bool:
    """Whether `code` opens a remote delivery's bounty; paid_by is
    ("remote", origin, "book", root hex, leaf index, leaf hash hex) or ("remote", origin, "single", code hash hex, "")."""
    if len(code) != 32:
        return False
    if paid_by[2] == "single":
        return keccak(code).hex() == paid_by[3]
    return leaf_hash(paid_by[4], code).hex() == paid_by[5]


class ClaimForwarder:
    """Publishes codes for other nodes; consumes the codes other nodes forward to this one.

    Thread-safety: the stream, the consumer and `_publishing` are used only on the bridge's
    loop. forward() runs on connection threads and hands the publish to the loop. accept_batch() runs on the
    bridge's pool, one batch at a time (the consumer loop awaits each), and alone touches `_seen`."""

    def __init__(self, bridge, node, node_id: str, replicas: int, timeout: float):
        self.bridge, self.node, self.node_id, self.replicas, self.timeout = bridge, node, node_id, replicas, timeout
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict(
            (key, None) for key in node.redeemer.journal.pending)
        self._task = None
        self._publishing: set = set()  # tasks storing codes in the stream (loop thread only)
        self.accepted = 0  # forwarded codes journaled by this node this run

    async def start(self) -> None:
        js = self.bridge.js
        config = StreamConfig(name=STREAM, subjects=["dm.claims.>"], retention=RetentionPolicy.WORK_QUEUE,
                              num_replicas=self.replicas, duplicate_window=DEDUPE_WINDOW)
        try:
            await js.stream_info(STREAM)
        except NotFoundError:
            await js.add_stream(config)
        durable = f"claims-{self.node_id}"
        self._subscription = await js.pull_subscribe(
            claims_subject(self.node_id), durable=durable, stream=STREAM,
            config=ConsumerConfig(durable_name=durable, ack_wait=30, max_ack_pending=1000))
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        """Let the codes being stored finish first: a graceful stop loses none."""
        if self._publishing:
            await asyncio.wait(set(self._publishing), timeout=PUBLISH_ATTEMPTS * (self.timeout + 1))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    # --- the recipient's node: forward --------------------------------------------------

    def forward(self, delivery: tuple, code_hex: str, transport) -> None:
        """A code for a remote delivery, from the recipient's connection thread. Raises
        ProtocolError (bad_code, unknown_message) like a local claim; `transport` (the
        recipient's) hears `unavailable` later if the code could not be stored."""
        msg_id, sender, recipient, paid_by, _ = delivery
        try:
            code = bytes.fromhex(code_hex.removeprefix("0x"))
        except ValueError:
            code = b""
        if not code_matches(paid_by, code):
            raise ProtocolError("bad_code", ref=msg_id)
        ledger = self.node.ledger
        if not ledger.settle(delivery):
            raise ProtocolError("unknown_message", ref=msg_id)
        origin = paid_by[1]
        claim = {"msg_id": msg_id, "sender": sender, "recipient": recipient, "code": code.hex(),
                 "paid_by": list(paid_by[2:5])}
        self.bridge.loop.call_soon_threadsafe(self._start_publish, origin, claim, delivery, transport)

    def _start_publish(self, origin: str, claim: dict, delivery: tuple, transport) -> None:
        task = self.bridge.loop.create_task(self._publish(origin, claim, delivery, transport))
        self._publishing.add(task)  # a node that stops waits for these (stop())
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, origin: str, claim: dict, delivery: tuple, transport) -> None:
        """Store the code in the stream; publishes of many codes run at once (one task each),
        so a recipient's claims do not wait for each other's JetStream acknowledgement. A
        publish that keeps failing gives the delivery back to the ledger and tells the
        recipient to claim again."""
        if TEST_HOLD:
            await asyncio.sleep(TEST_HOLD)
        data = json.dumps(claim).encode()
        headers = {"Nats-Msg-Id": f"{origin}:{claim['sender']}:{claim['msg_id']}"}
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.bridge.js.publish(claims_subject(origin), data, timeout=self.timeout, headers=headers)
                return
            except Exception as exc:  # a NATS server going away: the client reconnects meanwhile
                log.warning("cluster: storing the code for %s failed (%s), attempt %d of %d", claim["msg_id"], exc,
                            attempt + 1, PUBLISH_ATTEMPTS)
                await asyncio.sleep(0.5 * (attempt + 1))
        await self.bridge.offload(self._give_back, delivery, transport)

    def _give_back(self, delivery: tuple, transport) -> None:
        self.node.ledger.pending.setdefault(delivery[0], delivery)
        transport.send(ProtocolError("unavailable", "the network of nodes did not take your code: claim again "
                                     "in a moment", ref=delivery[0]).to_message())

    # --- the sender's node: consume -------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            try:
                messages = await self._subscription.fetch(batch=100, timeout=1)
            except NatsTimeout:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a NATS server going away: the client reconnects
                log.debug("cluster: fetching claims: %s", exc)
                await asyncio.sleep(0.5)
                continue
            try:  # one fsync for the batch, then the acks
                await self.bridge.offload(self.accept_batch, [message.data for message in messages])
            except Exception:  # not journaled: no ack, JetStream delivers them again
                log.exception("cluster: forwarded codes could not be journaled")
                await asyncio.sleep(1)
                continue
            for message in messages:
                try:
                    await message.ack()
                except Exception as exc:  # delivered again later; accept() sees it was journaled
                    log.debug("cluster: ack failed: %s", exc)

    def accept_batch(self, batch: list[bytes]) -> None:
        keys = [key for key in map(self.accept, batch) if key is not None]
        try:
            self.node.redeemer.journal.sync()
        except OSError:  # not durable: no ack, so JetStream delivers these again; accept them then
            for key in keys:
                self._seen.pop(key, None)
            raise
        while len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)
        self.accepted += len(keys)

    def accept(self, data: bytes) -> str | None:
        """A code forwarded to this node: check it against our own bounty, settle our ledger's
        delivery if we still hold it, and journal it for the redeemer (accept_batch fsyncs).
        Returns the claim's key when it was journaled now."""
        try:
            entry = json.loads(data)
            msg_id, sender, recipient, code = entry["msg_id"], entry["sender"], entry["recipient"], \
                bytes.fromhex(entry["code"])
            kind, ref, index = entry["paid_by"]
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: dropped a malformed forwarded code")
            return None
        node = self.node
        pin = node.pins.get(sender)
        payer = pin["eth_address"] if pin is not None else ""  # bounties are keyed by their sender's account
        if kind == "single":
            valid = len(code) == 32 and keccak(code).hex() == ref
            claim = Claim(msg_id, sender, code, payer=payer)
        else:
            root = bytes.fromhex(ref)
            book = node.index.book(payer, root) if payer else None
            valid = book is not None and book.tree is not None and book.tree.check_code(index, code)
            claim = Claim(msg_id, sender, code, root, index, payer=payer)
        if not valid:
            log.warning("cluster: dropped a forwarded code for %s that does not open our bounty", msg_id)
            return None
        delivery = node.ledger.awaiting(msg_id, recipient)
        if delivery is not None:
            node.ledger.settle(delivery)
        if claim.key in self._seen:
            return None
        node.redeemer.submit(claim, sync=False)
        self._seen[claim.key] = None
        return claim.key

"""Codes returned at one node for a message another node relayed, forwarded exactly once.

The sender paid its own node (its book's relayer), so only that node can redeem the code. The
recipient's node checks the code against the bounty (the sender's node sent the leaf hash
along with the message), then:

1. journals it as a forward (dm.relay.journal), fsynced with the burst's other claims before
   the `release` goes out, so a code whose key was released is never lost, even to a SIGKILL;
2. publishes it to the JetStream stream DM_CLAIMS on `dm.claims.<sender's node id>`, with
   `Nats-Msg-Id` set so that a retried publish is stored once, retrying (backing off) until
   JetStream stores it, and again from the journal after a restart;
3. marks it forwarded in the journal once JetStream acknowledged it.

The sender's node reads its subject through a durable consumer and acknowledges a code only
after its redeemer journaled it (fsynced). So a code survives the restart of either node or of
one NATS server: unacknowledged, it is delivered again, and the journal key, the keys seen this
run and the contract's spent-leaf check keep the payment to one.

The stream is bounded (node.py --cluster-claims-max-age, --cluster-claims-max): codes older than
a bounty's lifetime are dropped, and a node that stays away can have at most so many codes waiting
for it; past that, new ones wait in the recipient node's journal until there is room.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from dataclasses import dataclass
from itertools import islice

from dm.chain.books import keccak  # safe-pysha3: ~10x faster than eth_utils.keccak
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DiscardPolicy, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from dm.chain.books import leaf_hash
from dm.cluster import CLAIMS_MAX_AGE, CLAIMS_MAX_PER_NODE
from dm.relay.redeemer import Claim
from dm.wire import ProtocolError

log = logging.getLogger("node")
STREAM = "DM_CLAIMS"
SEEN_KEYS = 100_000  # claim keys remembered per run, so a redelivered code is not queued twice
DEDUPE_WINDOW = 3600  # seconds JetStream drops a second publish of the same claim
STORE_WINDOW = 256  # codes for one node being stored at once
# Seconds before storing again after JetStream refused (the node's share is full) or did not
# answer; then one code is tried first, the rest once it is stored.
RETRY_FIRST, RETRY_MAX = 0.5, 2.0
# Tests only: seconds to hold every forwarded code before storing it, to SIGKILL a node in that window.
TEST_HOLD = float(os.environ.get("DM_TEST_HOLD_FORWARD", "0") or 0)


@dataclass
class Forward:
    """A code owed to node `origin`, as stored in the stream (`data`) under `key` (Nats-Msg-Id)."""
    key: str
    origin: str
    data: bytes
    at: float  # wall time the recipient returned it


def stream_config(replicas: int, max_age: float, max_per_node: int) -> StreamConfig:
    return StreamConfig(name=STREAM, subjects=["dm.claims.>"], retention=RetentionPolicy.WORK_QUEUE,
                        num_replicas=replicas, duplicate_window=min(DEDUPE_WINDOW, max_age), max_age=max_age,
                        max_msgs_per_subject=max_per_node, discard=DiscardPolicy.NEW, discard_new_per_subject=True)


def claims_subject(node_id: str) -> str:
    return f"dm.claims.{node_id}"


def code_matches(paid_by: tuple, code: bytes) -> bool:
    """Whether `code` opens a remote delivery's bounty; paid_by is
    ("remote", origin, "book", root hex, leaf index, leaf hash hex, ...) or
    ("remote", origin, "single", code hash hex, "", "", ...), then the layer key and the time
    (chain seconds) after which the origin can no longer redeem the code (docs/PROTOCOL.md §11.1)."""
    if len(code) != 32:
        return False
    if paid_by[2] == "single":
        return keccak(code).hex() == paid_by[3]
    return leaf_hash(paid_by[4], code).hex() == paid_by[5]


class ClaimForwarder:
    """Publishes codes for other nodes; consumes the codes other nodes forward to this one.

    Thread-safety: the stream, the consumer, `_waiting` and `_drainers` are used only on the
    bridge's loop. forward() runs on connection threads: it journals the code there and hands
    it to the loop. accept_batch() runs on the bridge's pool, one batch at a time (the consumer
    loop awaits each), and alone touches `_seen`."""

    def __init__(self, bridge, node, node_id: str, replicas: int, timeout: float,
                 max_age: float = CLAIMS_MAX_AGE, max_per_node: int = CLAIMS_MAX_PER_NODE):
        self.bridge, self.node, self.node_id, self.replicas, self.timeout = bridge, node, node_id, replicas, timeout
        self.max_age, self.max_per_node = max_age, max_per_node
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict(
            (key, None) for key in node.redeemer.journal.pending)
        self._task = None
        # origin node -> its codes not yet stored, oldest first; a drainer task per origin stores them
        self._waiting: dict[str, collections.OrderedDict[str, Forward]] = {}
        self._drainers: dict[str, asyncio.Task] = {}
        self.accepted = 0  # forwarded codes journaled by this node this run

    async def start(self) -> None:
        js = self.bridge.js
        config = stream_config(self.replicas, self.max_age, self.max_per_node)
        try:
            current = (await js.stream_info(STREAM)).config
        except NotFoundError:
            await js.add_stream(config)
        else:
            if (current.max_age, current.max_msgs_per_subject, current.discard) != \
                    (config.max_age, config.max_msgs_per_subject, config.discard):
                try:  # the last node started sets the limits: give every node the same
                    await js.update_stream(config)
                    log.info("cluster: codes wait in %s at most %gs, at most %d for one node", STREAM, self.max_age,
                             self.max_per_node)
                except Exception as exc:  # e.g. other replicas: the stream keeps working with its old limits
                    log.warning("cluster: could not set the limits of %s (%s); it keeps max age %gs and %d codes a "
                                "node", STREAM, exc, current.max_age or 0, current.max_msgs_per_subject)
        durable = f"claims-{self.node_id}"
        self._subscription = await js.pull_subscribe(
            claims_subject(self.node_id), durable=durable, stream=STREAM,
            config=ConsumerConfig(durable_name=durable, ack_wait=30, max_ack_pending=1000))
        self._task = asyncio.get_running_loop().create_task(self._consume())
        journal = self.node.redeemer.journal
        left, journal.forwards = journal.forwards, {}
        if left:
            log.info("cluster: forwarding %d code(s) an earlier run took and JetStream had not stored", len(left))
        for entry in left.values():
            self._enqueue(Forward(entry["key"], entry["origin"], json.dumps(entry["claim"]).encode(), entry["at"]))

    async def stop(self) -> None:
        """Give the codes being stored a moment; any left are in the journal, forwarded at the next start."""
        drainers = list(self._drainers.values())
        if drainers:
            await asyncio.wait(drainers, timeout=self.timeout + 1)
        for task in [*self._drainers.values(), self._task]:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # --- the recipient's node: forward --------------------------------------------------

    def forward(self, delivery: tuple, code_hex: str, transport) -> None:
        """A code for a remote delivery, from the recipient's connection thread. Raises
        ProtocolError (bad_code, unknown_message) like a local claim. Journaled here without
        fsync: the burst's journal sync makes it durable before the release is written."""
        msg_id, sender, recipient, paid_by, _ = delivery
        try:
            code = bytes.fromhex(code_hex.removeprefix("0x"))
        except ValueError:
            code = b""
        if not code_matches(paid_by, code):
            raise ProtocolError("bad_code", ref=msg_id)
        claim_by = paid_by[7] if len(paid_by) > 7 else None  # absent from a node before it was sent
        if isinstance(claim_by, (int, float)) and self.node.index.clock() >= claim_by:
            self.node.ledger.settle(delivery)  # it waits for no code any more
            raise ProtocolError("expired", ref=msg_id)
        if not self.node.ledger.settle(delivery):
            raise ProtocolError("unknown_message", ref=msg_id)
        origin = paid_by[1]
        claim = {"msg_id": msg_id, "sender": sender, "recipient": recipient, "code": code.hex(),
                 "paid_by": list(paid_by[2:5])}
        forward = Forward(f"{origin}:{sender}:{msg_id}", origin, json.dumps(claim).encode(), time.time())
        self.node.redeemer.journal.add_forward(forward.key, origin, claim, forward.at)
        self.bridge.loop.call_soon_threadsafe(self._enqueue, forward)

    def _enqueue(self, forward: Forward) -> None:
        """On the loop: queue a code for its node, and start that node's drainer if none runs."""
        self._waiting.setdefault(forward.origin, collections.OrderedDict())[forward.key] = forward
        if forward.origin not in self._drainers:
            self._drainers[forward.origin] = self.bridge.loop.create_task(self._drain(forward.origin))

    async def _drain(self, origin: str) -> None:
        """Store `origin`'s codes, STORE_WINDOW at once (a recipient's claims do not wait for
        each other's acknowledgement), until none is left; when JetStream refuses (the node's
        share of the stream is full) or does not answer, try one again later, backing off."""
        waiting, backoff, window = self._waiting[origin], RETRY_FIRST, STORE_WINDOW
        try:
            while waiting:
                if TEST_HOLD:
                    await asyncio.sleep(TEST_HOLD)
                now, batch, done = time.time(), [], []
                for forward in list(islice(waiting.values(), window)):
                    if now - forward.at > self.max_age:  # its bounty has expired: it can pay nothing now
                        log.warning("cluster: dropped the code for %s, not stored for node %s within %gs",
                                    forward.key, origin[:8], self.max_age)
                        done.append(forward.key)
                    else:
                        batch.append(forward)
                results = await asyncio.gather(*(self._store(forward) for forward in batch))  # never raises
                done += [forward.key for forward, error in zip(batch, results) if error is None]
                for key in done:
                    waiting.pop(key, None)
                if done:
                    try:
                        await self.bridge.offload(self.node.redeemer.journal.forwarded, done)
                    except OSError as exc:  # they were stored: at worst forwarded again after a restart
                        log.error("cluster: marking %d code(s) forwarded failed: %s", len(done), exc)
                errors = [error for error in results if error is not None]
                if errors:
                    # once per streak of failures: a node that stays away must not fill the log
                    (log.warning if window > 1 else log.debug)(
                        "cluster: JetStream did not store %d code(s) for node %s (%s); they wait in the journal, "
                        "stored as soon as JetStream takes them", len(waiting), origin[:8], errors[0])
                    await asyncio.sleep(backoff)
                    backoff, window = min(2 * backoff, RETRY_MAX), 1
                elif window == 1:
                    log.info("cluster: JetStream stores the codes for node %s again", origin[:8])
                    backoff, window = RETRY_FIRST, STORE_WINDOW
        finally:
            del self._drainers[origin]  # no await since the last `while waiting`: nothing was added meanwhile
            if not waiting:
                del self._waiting[origin]

    async def _store(self, forward: Forward) -> Exception | None:
        try:
            await self.bridge.js.publish(claims_subject(forward.origin), forward.data, timeout=self.timeout,
                                         headers={"Nats-Msg-Id": forward.key})
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a full share of the stream, or a NATS server going away (the client reconnects)
            return exc

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
        delivery = node.ledger.awaiting(msg_id, recipient)
        if delivery is not None and delivery[3][0] in ("book", "single"):  # it names the account that paid
            payer = delivery[3][-1]
        else:  # bounties are keyed by their sender's account
            pin = node.pins.get(sender)
            payer = pin["eth_address"] if pin is not None else ""
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
        if delivery is not None:
            node.ledger.settle(delivery)
        if claim.key in self._seen:
            return None
        node.redeemer.submit(claim, sync=False)
        self._seen[claim.key] = None
        return claim.key

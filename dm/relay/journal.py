"""The node's durable record of what it is owed, so that a crash, a restart or a chain
rollback neither pays a bounty twice nor forgets one. Two append-only files in the node's
directory:

    node/deliveries.log   every delivery (its msg_id, sender, recipient and bounty): which
                          bounties carried a message, and which deliveries still wait for
                          their code. Written by one writer thread fed by the ledger.
    node/journal.jsonl    every code a recipient returned (a claim), until its redemption is
                          final (mined and `--confirmations` blocks deep): then a done line.
                          A claim stays (as a `claimed` line once done) for the claim timeout
                          after it, so that its recipient can claim again after a restart.
                          With --cluster, also every code returned here for a message another
                          node relayed (a forward), until JetStream stored it for that node.

Fsync policy, stated once:
  * claims and forwards: written and fsynced before the recipient gets any answer (group
    commit: one fsync per read burst), so a code the node accepted is never lost;
  * deliveries: the hot path only hands the burst's deliveries to a queue; the writer thread
    writes them to the file within WRITE_INTERVAL (5 ms) and fsyncs at most FSYNC_INTERVAL
    (0.5 s) later. A killed node (SIGKILL, a crash) loses only deliveries made in the last
    few milliseconds before it died (what was written is in the OS's page cache); a power
    cut loses at most the last FSYNC_INTERVAL. A lost delivery record can let that one leaf
    carry a second message after the restart; its code is still paid once.

Both files are compacted when the node starts: pending claims and deliveries are kept, the
claims made within the claim timeout, and the used bounties that could still pay (book or
bounty open and not expired).
"""
from __future__ import annotations

import collections
import json
import logging
import marshal
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from dm.chain.books import keccak  # safe-pysha3: ~10x faster than eth_utils.keccak
from dm.relay.ledger import BOUNTY_KEY_LENGTH, paying

log = logging.getLogger("node")

WRITE_INTERVAL = 0.005  # seconds the writer thread sleeps when nothing is queued
FSYNC_INTERVAL = 0.5  # deliveries are fsynced at most this long after they are written
MAX_RECORD = 2_000  # deliveries per record: one marshal call holds the GIL ~1 ms at most
# A record: magic, payload length, the wall and monotonic clocks when written, then the
# payload: marshal of a list of deliveries. marshal is the fastest serializer CPython has
# (about 0.3-0.8 us a delivery here, json 4 us); its format is tied to the Python version,
# so the file names its version and a node on another Python starts the file afresh.
_RECORD = struct.Struct(">4sIdd")
_MAGIC = b"DLV1"
_VERSION_LINE = f"dm deliveries marshal {marshal.version} python {sys.version_info[0]}.{sys.version_info[1]}\n".encode()


@dataclass
class Claim:
    """A code a recipient returned, waiting to be redeemed. `payer` is the account that
    registered the bounty or opened the book: bounties are keyed by it on chain. `recipient`
    and `at` (wall-clock time of the claim) let that recipient claim again after a restart
    (empty and 0 for a code another node forwarded, and in journals older than re-claims)."""
    msg_id: str
    sender: str
    code: bytes
    book: bytes | None = None
    index: int | None = None
    payer: str = ""
    recipient: str = ""
    at: float = 0.0

    @property
    def key(self) -> str:
        if self.book:
            return f"{self.payer}:{self.book.hex()}:{self.index}"
        return f"{self.payer}:{keccak(self.code).hex()}"

    @property
    def paid_by(self) -> tuple:
        """The bounty as the ledger keys it, with its payer (dm.relay.ledger.paying)."""
        if self.book:
            return ("book", self.book.hex(), self.index, self.payer)
        return ("single", keccak(self.code).hex(), self.payer)

    def to_json(self) -> dict:
        return {"msg_id": self.msg_id, "sender": self.sender, "code": self.code.hex(),
                "book": self.book.hex() if self.book else None, "index": self.index, "payer": self.payer,
                "recipient": self.recipient, "at": self.at}

    @classmethod
    def from_json(cls, data: dict) -> "Claim":
        return cls(data["msg_id"], data["sender"], bytes.fromhex(data["code"]),
                   bytes.fromhex(data["book"]) if data.get("book") else None, data.get("index"),
                   data.get("payer", ""), data.get("recipient", ""), float(data.get("at", 0.0)))


class Journal:
    """Append-only, fsynced: a claim line when a code arrives, a done line once its
    redemption is final. Compacted at start to the pending claims, and to `claimed` lines
    for the claims made in the last `keep_claimed_for` seconds (the node's claim timeout):
    `claimed` holds those, for a recipient to claim again (dm.relay.journal.restore).

    Thread-safety: every write and fsync is under `_lock`. Connection threads append claims
    without syncing and sync once at the end of their burst, before they answer anyone; the
    redeemer thread appends done lines. `pending`, `claimed`, `claimed_ids` and `forwards`
    are read at start, before any thread writes (dm.cluster.claims takes `forwards` once)."""

    def __init__(self, path: Path, keep_claimed_for: float = 0.0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pending, everything, self.forwards = self._replay()
        # (msg_id, recipient) of every claim, redeemed or not; recipient "" in a line older than it
        self.claimed_ids = {(claim.msg_id, claim.recipient) for claim in everything}
        since = time.time() - keep_claimed_for
        self.claimed = [c for c in everything if c.recipient and c.at >= since]  # oldest first
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            for claim in self.pending.values():
                handle.write(json.dumps({"op": "claim", **claim.to_json()}) + "\n")
            for claim in self.claimed:
                if claim.key not in self.pending:  # done: only its recipient's re-claim needs it now
                    handle.write(json.dumps({"op": "claimed", **claim.to_json()}) + "\n")
            for forward in self.forwards.values():
                handle.write(json.dumps(forward) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self._file = open(path, "a")
        self._lock = threading.Lock()
        self._dirty = False

    def _replay(self) -> tuple[dict[str, Claim], list[Claim], dict[str, dict]]:
        """(the claims not yet done, by key; every claim read, oldest first; the forwards not
        yet stored by JetStream, by key)."""
        pending: dict[str, Claim] = {}
        claimed: dict[tuple[str, str], Claim] = {}  # (sender, msg_id) -> its claim, redeemed or not
        # key -> forward line: codes owed to other nodes that JetStream had not stored; only
        # read at start (dm.cluster.claims takes them), not kept up to date afterwards
        forwards: dict[str, dict] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return pending, [], forwards
        for line in lines:
            try:
                entry = json.loads(line)
                if entry["op"] in ("claim", "claimed"):
                    claim = Claim.from_json(entry)
                    claimed.setdefault((claim.sender, claim.msg_id), claim)
                    if entry["op"] == "claim":
                        pending[claim.key] = claim
                elif entry["op"] == "done":
                    for key in entry["keys"]:
                        pending.pop(key, None)
                elif entry["op"] == "forward":
                    forwards[entry["key"]] = entry
                elif entry["op"] == "forwarded":
                    for key in entry["keys"]:
                        forwards.pop(key, None)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash mid-write
        return pending, sorted(claimed.values(), key=lambda claim: claim.at), forwards

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

    def add_forward(self, key: str, origin: str, claim: dict, at: float) -> None:
        """A code owed to node `origin` (dm.cluster.claims), made durable by the burst's
        sync() like a claim; `at` is the wall time it was returned."""
        self._append({"op": "forward", "key": key, "origin": origin, "claim": claim, "at": at}, sync=False)

    def forwarded(self, keys: list[str]) -> None:
        """JetStream stored these. Not fsynced: a lost line only means forwarding them again
        after a restart, which JetStream and the other node's journal deduplicate."""
        self._append({"op": "forwarded", "keys": keys}, sync=False)

    def close(self) -> None:
        with self._lock:
            self._sync()
            self._file.close()


class DeliveryLog:
    """node/deliveries.log: every delivery the node made, written by one writer thread.

    The hot path's only cost is in DeliveryLedger.delivered(): one `deque.append` of a tuple
    of the burst's deliveries (`feed`). The writer thread drains `feed`, marshals, writes and
    fsyncs by the policy in this module's docstring.

    Thread-safety: `feed` is a deque (append and popleft are atomic under the GIL); the file
    is touched only by the writer thread, and by load()/compact() before it starts and
    flush() after it stopped (or, for tests, from any thread while the writer is idle: flush
    takes `_write_lock`, which only the writer and flush take, never the hot path)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.feed: collections.deque = collections.deque()
        self._write_lock = threading.Lock()
        self._file = None
        self._unsynced_since: float | None = None
        self._thread: threading.Thread | None = None
        self.written = 0  # deliveries written so far (for tests and logs)

    # --- start: read what a previous run left, and rewrite it compactly -----------------------

    def load(self) -> list[tuple]:
        """Every delivery recorded, as (msg_id, sender, recipient, paid_by, delivered_at wall time),
        oldest first; a torn last record is ignored."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        if not data.startswith(_VERSION_LINE):
            if data:
                log.warning("%s was written by another Python or format; starting it afresh", self.path)
            return []
        deliveries: list[tuple] = []
        at = len(_VERSION_LINE)
        while at + _RECORD.size <= len(data):
            magic, length, wall, mono = _RECORD.unpack_from(data, at)
            body = data[at + _RECORD.size: at + _RECORD.size + length]
            if magic != _MAGIC or len(body) != length:
                break  # a torn record from a crash mid-write: nothing after it was written
            try:
                records = marshal.loads(body)
            except (ValueError, EOFError, TypeError):
                break
            for msg_id, sender, recipient, paid_by, delivered_at in records:
                deliveries.append((msg_id, sender, recipient, paid_by, wall - (mono - delivered_at)))
            at += _RECORD.size + length
        return deliveries

    def rewrite(self, deliveries: Iterable[tuple]) -> None:
        """Replace the file with these deliveries (delivered_at in wall time), atomically."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            handle.write(_VERSION_LINE)
            batch = list(deliveries)
            for start in range(0, len(batch), MAX_RECORD):
                handle.write(self._record(batch[start:start + MAX_RECORD], 0.0, 0.0))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def _record(deliveries: list, wall: float, mono: float) -> bytes:
        body = marshal.dumps(deliveries)
        return _RECORD.pack(_MAGIC, len(body), wall, mono) + body

    # --- the writer thread ----------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        self._file = open(self.path, "ab")
        if self._file.tell() == 0:
            self._file.write(_VERSION_LINE)
        self._thread = threading.Thread(target=self._run, args=(stop,), name="delivery-log", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while True:
            stopping = stop.is_set()
            try:
                self.flush(fsync=stopping)
            except OSError as exc:  # a full disk must not kill the node; the feed keeps the rest
                log.error("writing %s failed: %s", self.path, exc)
            if stopping:
                return
            stop.wait(WRITE_INTERVAL)

    def flush(self, fsync: bool = True) -> None:
        """Write what the feed holds; fsync when asked or when the policy says it is time."""
        with self._write_lock:
            if self._file is None or self._file.closed:
                return
            feed = self.feed
            chunk: list = []
            while feed:
                chunk.extend(feed.popleft())
                if len(chunk) >= MAX_RECORD:
                    self._write(chunk)
                    chunk = []
            if chunk:
                self._write(chunk)
            now = time.monotonic()
            if self._unsynced_since is not None and (fsync or now - self._unsynced_since >= FSYNC_INTERVAL):
                self._file.flush()
                os.fsync(self._file.fileno())
                self._unsynced_since = None

    def _write(self, chunk: list) -> None:  # with _write_lock held
        # A delivery relayed for another node of a cluster (paid_by "remote") is that node's
        # bounty, and carries its layer key: it is not this node's to keep.
        chunk = [delivery for delivery in chunk if delivery[3][0] != "remote"]
        if not chunk:
            return
        self._file.write(self._record(chunk, time.time(), time.monotonic()))
        self._file.flush()  # to the OS now: a killed process loses nothing written
        self.written += len(chunk)
        if self._unsynced_since is None:
            self._unsynced_since = time.monotonic()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush(fsync=True)
        with self._write_lock:
            if self._file is not None:
                self._file.close()


def restore(log_: DeliveryLog, journal: Journal, ledger, clock: Callable[[], float],
            still_payable: Callable[[str, tuple], bool],
            account_of: Callable[[str], str | None] = lambda sender: None) -> tuple[int, int]:
    """Put what a previous run left back into `ledger`, and compact the delivery log.

    A delivery whose code never came back and whose claim timeout has not run out is pending
    again (its code is accepted and paid); every recorded bounty stays used while
    `still_payable(sender, paid_by)` says it could still pay; a claim the journal kept for
    its re-claim window is remembered again (whether or not its bounty could still pay: the
    key is owed for the code taken). A delivery recorded before paid_by named its payer gets
    its sender's pinned account, `account_of(sender)`. Returns (pending, used)."""
    recorded = log_.load()
    wall_now, mono_now = time.time(), clock()
    pending, kept = [], []
    for msg_id, sender, recipient, paid_by, delivered_wall in recorded:
        if len(paid_by) == BOUNTY_KEY_LENGTH.get(paid_by[0]):
            account = account_of(sender)
            if account is None:
                continue
            paid_by = paying(paid_by, account)
        if not still_payable(sender, paid_by):
            continue
        age = wall_now - delivered_wall
        was_claimed = (msg_id, recipient) in journal.claimed_ids or (msg_id, "") in journal.claimed_ids
        if msg_id is not None and recipient is not None and not was_claimed and age <= ledger.claim_timeout:
            pending.append((msg_id, sender, recipient, paid_by, mono_now - age))
            kept.append((msg_id, sender, recipient, paid_by, delivered_wall))
        else:  # used, and no longer waiting for its code: never pending again (no recipient). Its
            # msg_id stays, so that the sender's resend of it is answered delivered, as before the restart.
            kept.append((msg_id, sender, None, paid_by, delivered_wall))
    claimed = []
    for claim in journal.claimed:  # a claim's delivery is rebuilt from it: the log dropped its msg_id
        at = mono_now - (wall_now - claim.at)
        claimed.append(((claim.msg_id, claim.sender, claim.recipient, claim.paid_by, at), keccak(claim.code), at))
    ledger.restore(pending, [(d[3], d[0]) for d in kept], claimed)
    log_.rewrite(kept)
    return len(pending), len(kept)

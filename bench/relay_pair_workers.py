"""The sender and receiver processes of bench/relay.py's throughput and latency phases.

Receivers and receipt drainers count frames by their `{"type":"..."` marker (Tally) instead
of decoding each one: at full speed the load generators must leave the node its core.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from array import array

from benchlib import own_cpu
from dm.wire import encode
from harness.wire import RECV, Wire, load_key
from relay_setup import make_envelope, open_and_announce

CHUNK = 256 * 1024  # bytes per sendall when sending at full speed
TS_DIGITS = 19  # len(str(time.time_ns())) until 2286
LATENCY_MARKER = b'"msg_id":"lat'  # paced msg_ids are "lat" + the send time in ns + "-name-i"


class Tally:
    """Counts frame types in a byte stream split anywhere, without decoding a frame.
    Sound because JSON escapes every quote inside a string: `{"type":"deliver"`
    can only be the start of a frame (our envelopes carry no `type` key)."""

    FRAME = b'{"type":"'

    def __init__(self, *markers: bytes):
        self.markers = (self.FRAME, *markers)
        self.counts = dict.fromkeys(self.markers, 0)
        self.keep = max(len(m) for m in self.markers) - 1
        self.tail = b""
        self.samples: list[str] = []  # the first few frames of an unexpected type

    def feed(self, data: bytes, expected: bytes) -> None:
        edge = self.tail + data[:self.keep]  # a marker split across two reads
        for marker in self.markers:
            self.counts[marker] += data.count(marker) + edge.count(marker)
        self.tail = data[-self.keep:]
        if len(self.samples) < 5 and data.count(self.FRAME) != data.count(expected):
            at = data.find(self.FRAME)
            while at >= 0 and len(self.samples) < 5:
                if not data.startswith(expected, at):
                    self.samples.append(data[at:at + 300].decode(errors="replace"))
                at = data.find(self.FRAME, at + 1)

    def __getitem__(self, marker: bytes) -> int:
        return self.counts[marker]


DELIVER = b'{"type":"deliver"'


class Drainer(threading.Thread):
    """Reads the sender's socket: receipts (one per message) and errors, so the node never blocks
    on us. At full speed it runs as a thread (sendall blocks); paced, the sending loop calls
    pump() after each burst instead, which saves a thread switch per burst."""

    RECEIPT, DELIVERED, ERROR = b'{"type":"receipt"', b'"status":"delivered"', b'{"type":"error"'

    def __init__(self, wire: Wire):
        super().__init__(name="drainer", daemon=True)
        self.wire = wire
        self.tally = Tally(self.RECEIPT, self.DELIVERED, self.ERROR)
        self.closed = threading.Event()
        self.last_at = time.monotonic()
        if wire.decoder.mid_frame:
            raise RuntimeError("the node sent a partial frame before the first message")
        self.feed(b"".join(encode(message) for message in wire.pending))
        wire.pending.clear()

    @property
    def acks(self) -> int:
        return self.tally[self.RECEIPT] + self.tally[self.ERROR]

    @property
    def delivered(self) -> int:
        return self.tally[self.DELIVERED]

    @property
    def errors(self) -> int:
        return self.tally[self.ERROR]

    def feed(self, data: bytes) -> None:
        if data:
            self.tally.feed(data, self.RECEIPT)
            self.last_at = time.monotonic()

    def pump(self, wait: float = 0.0) -> None:
        """Whatever is readable now (or within `wait` seconds), without blocking longer."""
        sock = self.wire.sock
        try:
            if wait:
                sock.settimeout(wait)
                data = sock.recv(RECV)
            else:
                data = sock.recv(RECV, socket.MSG_DONTWAIT)
            while data:
                self.feed(data)
                data = sock.recv(RECV, socket.MSG_DONTWAIT)
            self.closed.set()  # b"": the node closed the connection
        except (BlockingIOError, socket.timeout):
            pass
        except OSError:
            self.closed.set()
        finally:
            if wait:
                sock.settimeout(None)

    def run(self) -> None:
        sock = self.wire.sock
        sock.settimeout(None)
        try:
            while True:
                data = sock.recv(RECV)
                if not data:
                    break
                self.feed(data)
        except OSError:
            pass
        finally:
            self.closed.set()


def connect(cfg: dict, eth_address: str, buffer: int) -> tuple[Wire, dict]:
    wire = Wire(cfg["port"])
    wire.sock.setsockopt(socket.SOL_SOCKET, buffer, 4 << 20)
    return wire, wire.handshake(cfg["name"], *load_key(cfg["key_path"]), eth_address)


def encode_sends(name: str, peer: str, root: str, leaves: int, envelope: dict, paced: bool) -> list:
    """Every frame, encoded before the clock starts. Paced, the send time goes into the msg_id at
    send time: each frame is kept as (head, tail) around a TS_DIGITS-wide gap."""
    if not paced:
        return [encode({"type": "send", "to": peer, "msg_id": f"{name}-{i}",
                        "bounty": {"book": root, "index": i}, "envelope": envelope}) for i in range(leaves)]
    parts = []
    for i in range(leaves):
        frame = encode({"type": "send", "to": peer, "msg_id": f"lat{'0' * TS_DIGITS}-{name}-{i}",
                        "bounty": {"book": root, "index": i}, "envelope": envelope})
        at = frame.index(LATENCY_MARKER) + len(LATENCY_MARKER)
        parts.append((frame[:at], frame[at + TS_DIGITS:]))
    return parts


def batches(frames: list[bytes]) -> list[bytes]:
    """The frames joined into ~CHUNK-byte writes."""
    chunks, current, size = [], [], 0
    for frame in frames:
        current.append(frame)
        size += len(frame)
        if size >= CHUNK:
            chunks.append(b"".join(current))
            current, size = [], 0
    if current:
        chunks.append(b"".join(current))
    return chunks


def sender_main(cfg: dict, barrier, results, stop) -> None:
    """Connect, open and announce one book for every round, pre-encode every frame; then per
    round: barrier (the count is set) -> build the batches -> barrier (go) -> send -> all acked."""
    from dm.chain import ethereum

    name, leaves, paced, counts = cfg["name"], cfg["leaves"], cfg.get("rate"), cfg["counts"]
    wire, welcome = connect(cfg, ethereum.address_of(cfg["eth_key"]), socket.SO_SNDBUF)
    book, book_seconds = open_and_announce(wire, cfg["rpc_url"], cfg["contract"], cfg["eth_key"],
                                           welcome["node_eth_address"], leaves)
    frames = encode_sends(name, cfg["peer"], book.root.hex(), leaves,
                          make_envelope(name, cfg["peer"], cfg["envelope_size"]), bool(paced))
    wire.sock.settimeout(None)
    drainer = Drainer(wire)
    if not paced:
        drainer.start()
    offset = 0
    for round_no in range(len(counts)):
        barrier.wait(timeout=600)  # the main process has set counts[round_no]
        count = counts[round_no]
        if paced:
            frame_bytes = sum(len(h) + TS_DIGITS + len(t) for h, t in frames[offset:offset + count])
        else:
            chunks = batches(frames[offset:offset + count])
            frame_bytes = sum(map(len, chunks))
        cpu_before = own_cpu()
        delivered0, errors0 = drainer.delivered, drainer.errors
        barrier.wait(timeout=600)  # go
        first_send = time.time_ns()
        bursts = 0
        if paced:
            start = time.perf_counter()
            sent = 0
            while sent < count:
                due = min(count, int((time.perf_counter() - start) * paced) + 1)
                if due > sent:
                    stamp = str(time.time_ns()).encode()
                    wire.sock.sendall(b"".join(h + stamp + t for h, t in frames[offset + sent:offset + due]))
                    sent = due
                    bursts += 1
                drainer.pump()
                time.sleep(0.001)
        else:
            for chunk in chunks:
                wire.sock.sendall(chunk)
        last_send = time.time_ns()
        acks_at_last_send = drainer.acks
        offset += count
        while drainer.acks < offset and not drainer.closed.is_set() and not stop.is_set():
            if time.monotonic() - drainer.last_at > 30:
                break
            if paced:
                drainer.pump(wait=0.05)
            else:
                time.sleep(0.002)
        results.put(("sender", cfg["index"], round_no, {
            "name": name, "count": count, "first_send_ns": first_send, "last_send_ns": last_send,
            "acks": drainer.acks, "delivered_receipts": drainer.delivered, "errors": drainer.errors,
            "acks_at_last_send": acks_at_last_send, "errors_before_round": errors0, "delivered_before_round": delivered0,
            "error_samples": drainer.tally.samples, "book_seconds": round(book_seconds, 3),
            "frame_bytes": frame_bytes, "bursts": bursts, "cpu_seconds": round(own_cpu() - cpu_before, 3),
            "connection_closed": drainer.closed.is_set()}))
    stop.wait(120)
    wire.close()


def receiver_main(cfg: dict, barrier, results, stop) -> None:
    """Connect; per round: barrier, barrier (go), count `deliver` frames (and, paced, their one-way
    latency) until the round's count arrived or nothing came for 20 s."""
    wire, _ = connect(cfg, cfg["eth_address"], socket.SO_RCVBUF)
    latency, counts = cfg["latency"], cfg["counts"]
    sock, decoder = wire.sock, wire.decoder
    sock.settimeout(None)  # blocking; SO_RCVTIMEO wakes us up to check for the end (one syscall per recv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200_000))
    if decoder.mid_frame or wire.pending:
        raise RuntimeError("the node sent frames before the first delivery")
    carry = 0  # deliveries beyond a round's count (never expected: each round waits for the last)
    closed = False
    for round_no in range(len(counts)):
        barrier.wait(timeout=600)
        expected = counts[round_no]
        cpu_before = own_cpu()
        barrier.wait(timeout=600)
        got, other, carried, carry = carry, 0, carry, 0
        tally = Tally(DELIVER)
        first = last = None
        samples: list[str] = []
        lat = array("q")
        last_progress = time.monotonic()
        while got < expected and not stop.is_set() and not closed:
            try:
                data = sock.recv(RECV)
            except (BlockingIOError, socket.timeout):  # SO_RCVTIMEO expired
                if time.monotonic() - last_progress > 20:
                    break
                continue
            except OSError:
                closed = True
                break
            if not data:
                closed = True
                break
            now = time.time_ns()
            before = got
            if not latency:  # full speed: count frames without decoding them
                tally.feed(data, DELIVER)
                got, other = carried + tally[DELIVER], tally[Tally.FRAME] - tally[DELIVER]
                samples = tally.samples
                payloads = ()
            else:
                payloads = decoder.feed(data)
            for payload in payloads:
                if b'"type":"deliver"' in payload:
                    got += 1
                    at = payload.find(LATENCY_MARKER)
                    if at >= 0:
                        at += len(LATENCY_MARKER)
                        lat.append(now - int(payload[at:at + TS_DIGITS]))
                    else:  # a different encoding: parse it properly
                        lat.append(now - int(json.loads(payload)["msg_id"][3:3 + TS_DIGITS]))
                else:
                    other += 1
                    if len(samples) < 5:
                        samples.append(payload[:300].decode(errors="replace"))
            if got > before:
                first = first or now
                last = now
                last_progress = time.monotonic()
        if got > expected:
            carry, got = got - expected, expected
        results.put(("receiver", cfg["index"], round_no, {
            "name": cfg["name"], "expected": expected, "delivered": got, "other_frames": other,
            "other_samples": samples, "first_deliver_ns": first, "last_deliver_ns": last,
            "cpu_seconds": round(own_cpu() - cpu_before, 3), "connection_closed": closed}, lat.tobytes()))
    stop.wait(120)
    wire.close()

"""bench/relay.py, phases 1 and 2: PAIRS sender/receiver pairs through one node, at full speed
(throughput) or paced (latency). The processes themselves are in relay_pair_workers.py."""
from __future__ import annotations

import os
import threading
import time
from array import array

from benchlib import cpu_seconds, machine_busy, pct
from harness.node import NodeProcess
from relay_pair_workers import receiver_main, sender_main
from relay_setup import ENVELOPE_SIZE, PAIRS, RSA_KEYS, RelayBench


def run_pairs(bench: RelayBench, node: NodeProcess, label: str, first: int, leaves: int,
              rate: float | None = None, target_seconds: float | None = None) -> dict:
    """PAIRS sender and PAIRS receiver processes, each sender with a book of `leaves`.

    Paced (`rate`): one round of `first` messages per sender. Full speed: a first round of
    `first` per sender measures the rate, then a second round sized to last about
    `target_seconds` (at most the rest of the book) is the measurement. The node closes a
    connection whose data has been arriving mid-frame for 10 s (see the report), so a round
    must stay well under 10 s per connection."""
    workers, chain = bench.workers, bench.chain
    rounds = 1 if target_seconds is None else 2
    results, stop = workers.ctx.Queue(), workers.ctx.Event()
    counts = workers.ctx.Array("q", rounds)
    counts[0] = first
    barrier = workers.ctx.Barrier(2 * PAIRS + 1)
    procs = []
    for i in range(PAIRS):
        _, eth_key = chain.account(btk=leaves + 2_000)
        common = {"port": node.port, "index": i, "counts": counts}
        receiver = {**common, "name": f"{label}-r{i}", "key_path": bench.key_paths[(2 * i + 1) % RSA_KEYS],
                    "eth_address": bench.sink_address, "latency": rate is not None}
        sender = {**common, "name": f"{label}-s{i}", "peer": f"{label}-r{i}",
                  "key_path": bench.key_paths[2 * i % RSA_KEYS], "eth_key": eth_key, "leaves": leaves,
                  "rpc_url": chain.rpc_url, "contract": chain.token.address, "envelope_size": ENVELOPE_SIZE,
                  "rate": None if rate is None else rate / PAIRS}
        for role, target, cfg in ((f"{label} receiver {i}", receiver_main, receiver),
                                  (f"{label} sender {i}", sender_main, sender)):
            procs.append(workers.spawn(target, role, cfg, barrier, results, stop, results=results,
                                       barrier=barrier, cpus=bench.client_cpus))
    measured = []
    try:
        setup_started = time.perf_counter()
        for round_no in range(rounds):
            if round_no == 1:
                previous = measured[0]
                per_pair = int(previous["rate_msg_s"] * target_seconds / PAIRS) if previous["rate_msg_s"] else first
                counts[1] = max(first, min(leaves - first, per_pair))
            try:
                barrier.wait(timeout=600)  # the count is set
                setup_seconds = time.perf_counter() - setup_started
                node_cpu0, wall0, machine0 = cpu_seconds(node.pid), time.perf_counter(), machine_busy()
                anvil_cpu0 = cpu_seconds(chain.pid)
                barrier.wait(timeout=120)  # go
            except threading.BrokenBarrierError:
                raise RuntimeError(f"{label}: a worker failed:\n{workers.errors(results)}") from None
            senders, receivers, latencies = {}, {}, array("q")
            deadline = time.monotonic() + 600
            while len(senders) < PAIRS or len(receivers) < PAIRS:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: no result within 600 s")
                item = workers.next_result(results, 0.5)
                if item is None:
                    continue
                if item[0] == "sender":
                    senders[item[1]] = item[3]
                elif item[0] == "receiver":
                    receivers[item[1]] = item[3]
                    latencies.frombytes(item[4])
            node_cpu, wall_cpu = cpu_seconds(node.pid) - node_cpu0, time.perf_counter() - wall0
            anvil_cpu = cpu_seconds(chain.pid) - anvil_cpu0
            machine1 = machine_busy()
            machine = (machine1[0] - machine0[0]) / max(1e-9, machine1[1] - machine0[1])
            measured.append(summarize(senders, receivers, latencies, rate, node_cpu, wall_cpu, machine,
                                      setup_seconds))
            measured[-1]["anvil_cpu_seconds"] = round(anvil_cpu, 2)
            # Busy CPU not spent by the node, our clients or anvil: kernel softirq, and other work
            measured[-1]["unattributed_cpu_seconds"] = round(
                (machine1[0] - machine0[0]) - node_cpu - anvil_cpu - measured[-1]["client_cpu_seconds"], 2)
            measured[-1]["cores"] = len(os.sched_getaffinity(0))
            setup_started = time.perf_counter()
    finally:
        stop.set()
        workers.reap(procs)
    phase = dict(measured[-1])
    phase.update({"pairs": PAIRS, "envelope_bytes": ENVELOPE_SIZE, "book_leaves_per_sender": leaves})
    if rounds == 2:
        phase["calibration_round"] = {k: measured[0][k] for k in ("messages_per_pair", "delivered",
                                                                 "wall_seconds", "rate_msg_s", "errors")}
        phase["target_seconds"] = target_seconds
    return phase


def summarize(senders: dict, receivers: dict, latencies, rate, node_cpu, wall_cpu, machine, setup) -> dict:
    """One round's figures from the workers' reports."""
    per_sender = senders[0]["count"]
    sent = sum(s["count"] for s in senders.values())
    delivered = sum(r["delivered"] for r in receivers.values())
    first = min(s["first_send_ns"] for s in senders.values())
    lasts = [r["last_deliver_ns"] for r in receivers.values() if r["last_deliver_ns"]]
    wall = (max(lasts) - first) / 1e9 if lasts else float("nan")
    send_wall = (max(s["last_send_ns"] for s in senders.values()) - first) / 1e9
    errors = sum(s["errors"] - s["errors_before_round"] for s in senders.values())
    out = {
        "messages_per_pair": per_sender, "sent": sent, "delivered": delivered,
        "frame_bytes_avg": round(sum(s["frame_bytes"] for s in senders.values()) / max(1, sent)),
        "wall_seconds": round(wall, 3), "send_seconds": round(send_wall, 3),
        "rate_msg_s": round(delivered / wall) if lasts else 0,
        "receipts_delivered": sum(s["delivered_receipts"] - s["delivered_before_round"] for s in senders.values()),
        "errors": errors, "error_samples": [e for s in senders.values() for e in s["error_samples"]][:5],
        "connections_closed_by_node": sum(s["connection_closed"] for s in senders.values())
        + sum(r["connection_closed"] for r in receivers.values()),
        "other_frames_to_receivers": sum(r["other_frames"] for r in receivers.values()),
        "node_cpu_seconds": round(node_cpu, 2), "node_cpu_share": round(node_cpu / wall_cpu, 2),
        "node_cpu_us_per_message": round(node_cpu / max(1, delivered) * 1e6, 1),
        "machine_cpu_busy": round(machine, 2),
        "client_cpu_seconds": round(sum(s["cpu_seconds"] for s in senders.values())
                                    + sum(r["cpu_seconds"] for r in receivers.values()), 2),
        "setup_seconds": round(setup, 1),
        "book_seconds_max": max(s["book_seconds"] for s in senders.values()),
    }
    if rate is not None:
        lat_ms = sorted(v / 1e6 for v in latencies)
        out.update({
            "target_rate_msg_s": rate, "achieved_send_rate_msg_s": round(sent / send_wall),
            "bursts_per_sender": round(sum(s["bursts"] for s in senders.values()) / len(senders)),
            "samples": len(lat_ms), "p50_ms": round(pct(lat_ms, 50), 3), "p90_ms": round(pct(lat_ms, 90), 3),
            "p99_ms": round(pct(lat_ms, 99), 3), "p999_ms": round(pct(lat_ms, 99.9), 3),
            "max_ms": round(lat_ms[-1], 3) if lat_ms else None, "min_ms": round(lat_ms[0], 3) if lat_ms else None,
        })
    return out

#!/usr/bin/env python3
"""Relay benchmark: what one node.py process can carry.

    .venv/bin/python bench/relay.py              # run from the repo root (~3-5 minutes)
    .venv/bin/python bench/relay.py --quick      # smaller counts, a smoke test
    .venv/bin/python bench/relay.py --only throughput,latency
    .venv/bin/python bench/relay.py --profile [--only connections]   # node under cProfile

Starts its own anvil (throwaway data directory, free loopback port), deploys
BountyToken, and runs node.py as a SUBPROCESS (its own process group, always
killed at the end). Four measurements:

1. throughput   4 sender/receiver pairs, each client in its own process
                (multiprocessing, spawn). Envelopes of ~512 bytes serialized
                (random base64, shaped like dm.crypto.seal's output; the node
                never decrypts). Bounty checking is ON: every sender opens a
                real book on anvil bound to the node (BountyToken.openBook)
                with one leaf per message, announces it with a `book` frame
                and waits for the ack; message i carries leaf i. Frames are
                encoded before the clock starts and written in ~256 KB
                sendall batches; senders drain their `receipt`s in a thread.
                Rate = messages delivered / (first send -> last delivery).
                Receivers and receipt drainers count frames by their `{"type":"..."`
                marker (class Tally) instead of decoding each one: the load
                generators must leave the node its core. With 2+ CPUs the node
                runs on the first and the clients on the rest (--no-pin: not).
2. latency      the same, paced at 10,000 msg/s in total (2,500/s per sender,
                a burst every ~1 ms). The send time (time.time_ns) travels in
                the msg_id; receivers on the same machine compute one-way
                latency. p50 / p99 / max.
3. connections  5,000 authenticated connections held open at once (a few
                processes, a handful of RSA keys shared across names), then
                `peers` must list them all and one paid message must still be
                relayed between two of them. The node pins name -> key in
                DATA/node/pins.json and rewrites the whole file on every NEW
                name, so connecting 5,000 never-seen names costs minutes; the
                5,000 are therefore pre-pinned as returning users (the file is
                written before the node starts), and the cost of first-time
                registration at that pin count is measured separately.
4. e2e          one real dm.client.core.ChatClient (RSA-OAEP/AES-GCM/RSA-PSS,
                paying from books of 100, the client's default) sends 2,000
                messages to one real ChatClient in another process, through a
                node with the default batching (--batch-size 50 --batch-wait 1);
                until the last message is received and until the last `paid`.
                Then pay="single" (one registerBounty tx per message) with 300.
                Then what bounds it: dm.crypto.seal alone, open_envelope alone,
                the chain calls (timed around the payer), and the node's share.

Phases 1-3 use one node started with --batch-wait 3600 --batch-size 1000000,
so no redemption runs while measuring. Prints a markdown table with PASS/FAIL
against the targets and writes everything to bench/results/relay.json
Each of phases 1-3 gets a fresh node (the benchmark's receivers never return
codes, so pending deliveries would pile up from one phase into the next).
--profile runs those nodes under cProfile, every thread, for the phases chosen
with --only (default: throughput), prints the top functions and writes
bench/results/relay-node-PHASE.prof; its rates are then not comparable.

The phases live in relay_pairs.py (with relay_pair_workers.py), relay_connections.py and
relay_e2e.py; what they share in relay_setup.py and harness/.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchlib import RESULTS_DIR, ROOT, environment, finish, interrupt_on_sigterm, verdict
from relay_connections import connection_plan, run_connections
from relay_e2e import run_e2e
from relay_pairs import run_pairs
from relay_setup import ENVELOPE_SIZE, PAIRS, RelayBench

RESULTS = RESULTS_DIR / "relay.json"
LATENCY_RATE = 10_000  # msg/s in total
TARGETS = {"throughput": 100_000, "p99_ms": 5.0, "connections": 5_000}

# Throughput: each sender's book has `book_per_pair` leaves; a calibration round of
# `calibration_per_pair` sizes the measured round to last about `throughput_seconds`.
FULL = {"book_per_pair": 100_000, "calibration_per_pair": 5_000, "throughput_seconds": 5.0,
        "latency_seconds": 4.0, "connections": 5_000, "new_names": 100, "e2e_book": 2_000, "e2e_single": 300}
QUICK = {"book_per_pair": 20_000, "calibration_per_pair": 2_000, "throughput_seconds": 2.0,
         "latency_seconds": 2.0, "connections": 1_000, "new_names": 20, "e2e_book": 300, "e2e_single": 50}


def report(out: dict) -> str:
    rows = []
    t, lat, conn, e2e = (out.get(k) for k in ("throughput", "latency", "connections", "e2e"))
    profiled = out["params"].get("profile")
    if t:
        ok = None if profiled else t["rate_msg_s"] >= TARGETS["throughput"]
        rows.append(("Node throughput, 4 pairs, ~512 B envelopes, book bounties checked"
                     + (" (node under cProfile)" if profiled else ""),
                     f"{t['rate_msg_s']:,} msg/s ({t['delivered']:,}/{t['sent']:,} in {t['wall_seconds']} s; "
                     f"node CPU {t['node_cpu_share']:.0%} of a core, {t['node_cpu_us_per_message']} µs/msg)",
                     f">= {TARGETS['throughput']:,} msg/s", verdict(ok)))
    if lat:
        rows.append((f"One-way latency at {lat['target_rate_msg_s']:,} msg/s (sent {lat['achieved_send_rate_msg_s']:,}/s)",
                     f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
                     f"({lat['samples']:,}/{lat['sent']:,} delivered)",
                     f"p99 <= {TARGETS['p99_ms']:g} ms",
                     verdict(None if profiled else lat["p99_ms"] <= TARGETS["p99_ms"] and lat["delivered"] == lat["sent"])))
    if conn:
        rows.append(("Authenticated connections open at once",
                     f"{conn['online_names_in_peers']:,} online in `peers` ({conn['held_open']:,} held, "
                     f"{conn['failed']} failed); connected in {conn['connect_seconds']} s "
                     f"({conn['connections_per_s']:,}/s)",
                     f">= {TARGETS['connections']:,}",
                     verdict(None if profiled else conn["online_names_in_peers"] >= TARGETS["connections"])))
        rows.append(("Relay with all of them open", f"{'ok' if conn['relay_with_all_open'] else 'FAILED'}, "
                     f"{conn['relay_ms']} ms; node {conn['node_threads']} threads, RSS {conn['node_rss']}", "", ""))
        rows.append((f"First-time registration at {conn['target']:,} pinned names",
                     f"{conn['new_registration_ms_each']} ms per new name ({conn['new_registrations']} measured)",
                     "", ""))
    if e2e:
        b, s, p, bd = e2e["book"], e2e["single"], e2e["parts"], e2e["bound"]
        rows.append((f"E2E ChatClient -> ChatClient, pay=book, {b['messages']:,} msgs",
                     f"{b['rate_received_msg_s']} msg/s to last received ({b['seconds_to_last_received']} s); "
                     f"{b['rate_paid_msg_s']} msg/s to last paid ({b['seconds_to_last_paid']} s)", "", ""))
        rows.append((f"E2E pay=single, {s['messages']} msgs",
                     f"{s['rate_received_msg_s']} msg/s to last received ({s['seconds_to_last_received']} s); "
                     f"{s['rate_paid_msg_s']} msg/s to last paid; registerBounty {s['chain_ms_per_message']} ms/msg",
                     "", ""))
        cp = p.get("client_path") or {}
        client = (f" (as ChatClient runs them: seal {cp['seal_ms_each']}, open {cp['open_ms_each']})"
                  if "seal_ms_each" in cp else "")
        rows.append(("E2E parts alone, ms per message",
                     f"seal {p['seal_ms_each']}, open_envelope {p['open_ms_each']}{client}, "
                     f"openBook {b['chain_ms_per_message']} ({b['chain_calls']} books), "
                     f"node relay {p['node_relay_ms_each']} + claim fsync {p['node_journal_fsync_ms_each']}; "
                     f"in place: seal {b['seal_in_place_ms_per_message']}, measured "
                     f"{bd.get('book', {}).get('measured_ms_per_message')}", "", ""))
        for pay in ("book", "single"):
            if pay in bd:
                rows.append((f"E2E bound (pay={pay})", f"**{bd[pay]['bound']}**: {bd[pay]['summary']}", "", ""))
    env = out["environment"]
    lines = [f"Environment: {env['cpu_count']} CPUs ({env['cpu_model']}), Python {env['python']}, "
             f"machine {env['background_cpu_busy_at_start']:.0%} busy before the run "
             f"(load average {env['loadavg_at_start']:.2f}); node.py {out['code'].get('node_py_sha256')}"
             f"{' (uncommitted changes)' if out['code'].get('node_py_modified') else ''} at {out['code'].get('git_head')}; "
             f"throughput/latency node on CPU {out['params'].get('node_cpus')}, clients on {out['params'].get('client_cpus')}",
             "", "| Measurement | Result | Target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def code_version() -> dict:
    """Which node.py was measured (it changes while the benchmark is used to tune it)."""
    import hashlib

    version = {"node_py_sha256": hashlib.sha256((ROOT / "node.py").read_bytes()).hexdigest()[:16]}
    with contextlib.suppress(Exception):
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        version["git_head"] = git("rev-parse", "--short", "HEAD")
        version["node_py_modified"] = bool(git("status", "--porcelain", "node.py"))
    return version


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke test)")
    parser.add_argument("--no-pin", action="store_true",
                        help="throughput and latency: let the scheduler place the node and its clients "
                             "(default: the node on the first CPU, the clients on the others)")
    parser.add_argument("--only", help="comma-separated phases: throughput, latency, connections, e2e "
                                       "(default: all; with --profile: throughput)")
    parser.add_argument("--profile-clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: each thread's CPU time (where the work is); wall: also time spent waiting "
                             "for the GIL and locks, charged to the function that waited (default: cpu)")
    parser.add_argument("--profile", action="store_true",
                        help="run the relay node under cProfile (every thread); writes "
                             "bench/results/relay-node-PHASE.prof")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    only = args.only or ("throughput" if args.profile else "throughput,latency,connections,e2e")
    phases = {p.strip() for p in only.split(",") if p.strip()}
    unknown = phases - {"throughput", "latency", "connections", "e2e"}
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    interrupt_on_sigterm()
    started = time.perf_counter()
    env = environment()
    out = {"environment": env, "code": code_version(), "params": {
        **sizes, "quick": args.quick, "phases": sorted(phases), "profile": args.profile and args.profile_clock,
        "pairs": PAIRS, "envelope_bytes": ENVELOPE_SIZE, "latency_rate": LATENCY_RATE, "targets": TARGETS}}
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    bench = RelayBench(args, sizes, tmp)
    out["params"]["node_cpus"] = sorted(bench.node_cpus) if bench.node_cpus else "unpinned"
    out["params"]["client_cpus"] = sorted(bench.client_cpus) if bench.client_cpus else "unpinned"
    failed = None
    try:
        print("starting anvil and deploying BountyToken ...", flush=True)
        bench.start()
        names, pins = connection_plan(bench) if "connections" in phases else ([], None)
        if "throughput" in phases:
            print(f"throughput: {PAIRS} pairs, books of {sizes['book_per_pair']:,}, calibration round of "
                  f"{sizes['calibration_per_pair']:,} per pair, then ~{sizes['throughput_seconds']:g} s ...",
                  flush=True)
            node = bench.node("throughput", cpus=bench.node_cpus)
            out["throughput"] = run_pairs(bench, node, "t", sizes["calibration_per_pair"], sizes["book_per_pair"],
                                          target_seconds=sizes["throughput_seconds"])
            bench.done_with(node, "throughput", out)
            print(f"  {out['throughput']['rate_msg_s']:,} msg/s", flush=True)
        if "latency" in phases:
            per_sender = int(LATENCY_RATE / PAIRS * sizes["latency_seconds"])
            print(f"latency: {LATENCY_RATE:,} msg/s for {sizes['latency_seconds']:g} s ...", flush=True)
            node = bench.node("latency", cpus=bench.node_cpus)
            out["latency"] = run_pairs(bench, node, "l", per_sender, per_sender, rate=LATENCY_RATE)
            bench.done_with(node, "latency", out)
            print(f"  p50 {out['latency']['p50_ms']} ms, p99 {out['latency']['p99_ms']} ms", flush=True)
        if "connections" in phases:
            print(f"connections: {sizes['connections']:,} ...", flush=True)
            node = bench.node("connections", max_connections=sizes["connections"] + 1_000, pins=pins)
            out["connections"] = run_connections(bench, node, names)
            bench.done_with(node, "connections", out)
            print(f"  {out['connections']['online_names_in_peers']:,} online, "
                  f"{out['connections']['connect_seconds']} s", flush=True)
        if "e2e" in phases:
            print(f"e2e: ChatClient x {sizes['e2e_book']:,} (book), x {sizes['e2e_single']} (single) ...", flush=True)
            node = bench.node("e2e", profiled=False, batch_size=50, batch_wait=1)
            out["e2e"] = run_e2e(bench, node, out.get("throughput", {}).get("rate_msg_s"))
            node.stop()
    except BaseException as exc:
        failed = exc
        traceback.print_exc()
        bench.print_node_logs()
    finally:
        bench.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return finish(out, started, failed, RESULTS, report(out))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Channel benchmark: one message to a channel of N members, end to end, and its gas.

    .venv/bin/python bench/channel.py [--sizes 10,100,1000]    # run from the repo root

Starts its own anvil (throwaway data directory, free loopback port) and node.py as a
SUBPROCESS (`--log-level info --batch-size 1000 --batch-wait 2 --max-connections 5000`,
its own process group, always stopped at the end). For each size N:

- N member names and one sender. RSA key generation costs ~50-100 ms a key, so a handful
  of RSA key pairs is generated once and shared across names (the node pins name -> key,
  not key -> name): each name's NAME_PRIVATE.pem / NAME_PUBLIC.pem is a symlink to one of
  them. Every name has its own Ethereum account (NAME_ETH.key, 0600), given up front
  what the node's dev-chain faucet would give a new user (100 ETH, 10,000 BTK) in one
  burst of transactions from an account of ours: otherwise the node sends two
  transactions inside each new name's handshake (~12 handshakes/s).
- The N members are real dm.client.core.ChatClients spread over spawned worker processes
  (~250 a process); each joins #benchN. A member's `message` callback records
  time.time() on arrival and whether the copy was genuine (verified and decrypted).
- The sender, a ChatClient in this process with a book of 2N leaves, joins, sends a
  warm-up message (opens the book, looks up and pins every member's key, wraps a session
  key per member; members look up the sender once and unwrap once), waits for every
  member and for the node to redeem the warm-up's codes, then measures ONE message:
  t0 = just before send_to_channel; time to the last member's arrival, p50, count.
- Gas: the node's "redeemed N code(s) in tx ... (gas G)" log lines for the measured
  message's codes (the node's BTK balance must rise by N), plus the sender's openBook
  receipt (BookOpened event of its book), amortized over the book's size and counted
  for the N leaves the message used: per copy = (redeem gas + openBook * N / size) / N.

Prints a markdown table with PASS/FAIL and writes bench/results/channel.json. The run itself
is in channel_run.py, the member processes in channel_members.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchlib import RESULTS_DIR, environment, finish, interrupt_on_sigterm, verdict
from channel_run import NODE_OPTIONS, PER_WORKER, RSA_KEYS, ChannelBench

RESULTS = RESULTS_DIR / "channel.json"
TARGET_SECONDS = 2.0  # 1,000 members reached
TARGET_GAS = 10_000  # per delivered copy


def crypto_alone(n: int) -> dict:
    """The same crypto as the measured message, in one thread with nothing else running:
    the sender's seal_many to n members with warm session keys, and each member's
    open_envelope with a warm unwrap cache (RSA-PSS verify of the batch signature, Merkle
    proof, AES-GCM). Puts the CPU the member processes spent in the run in proportion."""
    from dm import crypto

    keys = [crypto.generate_private_key() for _ in range(2)]
    sender_key = keys[0]
    items = [({"text": "x", "code": "ab" * 32, "channel": "#c"}, f"m{i:04d}", keys[1].public_key())
             for i in range(n)]
    session_keys = crypto.SessionKeys()
    caches = [crypto.UnwrapCache() for _ in range(n)]

    def open_all(envelopes) -> float:
        started = time.perf_counter()
        for i, envelope in enumerate(envelopes):
            crypto.open_envelope(envelope, recipient=envelope["to"], recipient_key=keys[1],
                                 sender_public_key=sender_key.public_key(), unwrap_cache=caches[i])
        return time.perf_counter() - started

    open_all(crypto.seal_many(items, sender="s", sender_key=sender_key, session_keys=session_keys))
    started = time.perf_counter()
    envelopes = crypto.seal_many(items, sender="s", sender_key=sender_key, session_keys=session_keys)
    seal_s = time.perf_counter() - started
    open_s = open_all(envelopes)
    return {"members": n, "seal_many_warm_ms": round(seal_s * 1e3, 1),
            "open_envelope_warm_us_per_copy": round(open_s / n * 1e6, 1),
            "open_envelope_warm_total_ms": round(open_s * 1e3, 1)}


def report(out: dict) -> str:
    lines = ["| members | delivered | time to last member (ms) | p50 (ms) | redeem gas per copy "
             "| book gas per copy | total gas per copy |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["runs"]:
        if "measured" not in r:
            lines.append(f"| {r['members']:,} | failed: {r.get('error', '?')[:60]} | | | | | |")
            continue
        m, g = r["measured"], r["gas_per_copy"]
        lines.append(f"| {r['members']:,} | {m['delivered']:,} | {m['to_last_ms']:,.0f} | {m['p50_ms']:,.0f} | "
                     f"{g['redeem']:,.0f} | {g['book']:,.0f} | {g['total']:,.0f} |")
    lines += ["", "| target | result | |", "|---|---|---|"]
    for name, (value, ok) in out["targets"].items():
        lines.append(f"| {name} | {value} | {verdict(ok)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated channel sizes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (node log, data)")
    parser.add_argument("--worker-switch-interval", type=float, default=None,
                        help="diagnosis only: sys.setswitchinterval in the member worker processes (default: "
                             "CPython's 5 ms). Hundreds of client threads in one process wake every interval "
                             "while they wait for the GIL; a longer interval shows how much of the time that is")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    interrupt_on_sigterm()
    started = time.perf_counter()
    env = environment()
    node_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in NODE_OPTIONS.items())
    out: dict = {"environment": env, "params": {"sizes": sizes, "per_worker": PER_WORKER, "rsa_keys": RSA_KEYS,
                                                "node_flags": node_flags,
                                                "sender_book_size": "2N (warm-up + measured message)",
                                                "worker_switch_interval": args.worker_switch_interval},
                 "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="channel-bench-"))
    bench = ChannelBench(tmp, args.worker_switch_interval)
    failed = None
    try:
        print("starting anvil, deploying BountyToken, starting node.py ...", flush=True)
        bench.start()
        offset = 0
        for n in sizes:
            print(f"#bench{n}: {n:,} members ...", flush=True)
            try:
                r = bench.run_size(n, offset)
            except Exception as exc:  # noqa: BLE001 - reported, the other sizes still run
                traceback.print_exc()
                if bench.node is not None:
                    bench.node.print_tail()
                r = {"members": n, "error": f"{type(exc).__name__}: {exc}"}
                failed = failed or exc
            offset += n + 1
            out["runs"].append(r)
            if "measured" in r:
                m = r["measured"]
                print(f"  connected+joined in {r['connect_join_s']} s over {r['workers']} worker(s); warm-up "
                      f"(opens the book, cold keys) reached the last member in {r['warmup']['to_last_ms']:,.0f} ms; "
                      f"measured: {m['delivered']:,} delivered, last at {m['to_last_ms']:,.0f} ms "
                      f"(sealed and written at {m['send_to_channel_ms']:,.0f} ms, last receipt "
                      f"{m['last_receipt_ms']} ms), {len(m['redemptions'])} redeem tx, "
                      f"{r['gas_per_copy']['total']:,.0f} gas per copy", flush=True)
        bench.stop()  # the micro-measurement below runs on an idle machine
        largest = max(sizes)
        out["crypto_alone"] = c = crypto_alone(largest)
        print(f"crypto alone, one thread, {largest:,} members: seal_many (warm session keys) "
              f"{c['seal_many_warm_ms']} ms; open_envelope (warm unwrap cache) "
              f"{c['open_envelope_warm_us_per_copy']} us a copy", flush=True)
        top = next((r for r in reversed(out["runs"]) if "measured" in r), None)
        if top:
            m, cpu = top["measured"], top["measured"]["cpu_s_during"]
            print(f"where the {top['members']:,}-member time goes: sender sealed and wrote every copy by "
                  f"{m['send_to_channel_ms']:,.0f} ms; the node's last receipt (all copies relayed) at "
                  f"{m['last_receipt_ms']:,.0f} ms; last member at {m['to_last_ms']:,.0f} ms. CPU seconds in "
                  f"the {m['window_s']:.2f} s window on {os.cpu_count()} cores: node {cpu['node']}, member "
                  f"processes {cpu['workers']} (system {cpu['workers_system']}, "
                  f"{cpu['workers_ctx_switches']:,} context switches; inside ChatClient._on_deliver "
                  f"{m['members_on_deliver_cpu_s']}, where the crypto alone is "
                  f"{c['open_envelope_warm_total_ms'] / 1e3:.2f}), this process {cpu['main_process_sender']}, "
                  f"anvil {cpu['anvil']}; whole machine {cpu['machine']}", flush=True)
    except BaseException as exc:
        failed = exc
        traceback.print_exc()
        if bench.node is not None:
            bench.node.print_tail()
    finally:
        bench.stop()
        if args.keep:
            print(f"kept {tmp} (node log: {bench.data / 'node.log'})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    big = next((r for r in out["runs"] if r.get("members") == 1000 and "measured" in r), None)
    out["targets"] = {
        "1,000 members reached in < 2 s": (
            f"{big['measured']['delivered']:,} in {big['measured']['to_last_ms'] / 1e3:.2f} s" if big else "not run",
            (big["measured"]["delivered"] == 1000 and big["measured"]["to_last_ms"] < TARGET_SECONDS * 1e3)
            if big else None),
        "gas per delivered copy <= 10,000 (1,000 members)": (
            f"{big['gas_per_copy']['total']:,.0f}" if big else "not run",
            big["gas_per_copy"]["total"] <= TARGET_GAS if big else None),
    }
    for r in out["runs"]:
        if "gas_per_copy" in r and r["members"] != 1000:
            out["targets"][f"gas per delivered copy <= 10,000 ({r['members']:,} members)"] = (
                f"{r['gas_per_copy']['total']:,.0f}", r["gas_per_copy"]["total"] <= TARGET_GAS)
    return finish(out, started, failed, RESULTS, report(out))


if __name__ == "__main__":
    sys.exit(main())

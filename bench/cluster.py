#!/usr/bin/env python3
"""Cluster benchmark: same-node vs cross-node delivery, a channel spread over three nodes, and
the aggregate of one, two and three nodes, side by side in one run.

    .venv/bin/python bench/cluster.py [--messages 2000] [--latency 200] [--channel 1000]

Starts its own anvil (throwaway data directory, free port), a 3-server NATS cluster
(dm.cluster.natsd, JetStream on each) and three `node.py --cluster` subprocesses
(bench/harness; `--cluster-timeout 10`, so that 1,000 handshakes at once on a busy machine
do not give up on JetStream), all stopped at the end. Every message is a real one: a ChatClient seals
and pays it, the node(s) relay it, a ChatClient verifies, decrypts and returns the code.

- pairs: a sender and a receiver ChatClient in one spawned worker process. "same node": both
  on node 1; "cross node": the receiver on node 2, so every message is a NATS request and
  its code goes back to node 1 through JetStream.
  - latency: --latency messages one at a time, send to arrival (p50, p99);
  - throughput: --messages sent in batches of 100, first send to last arrival;
  - node CPU per message: the CPU seconds all three node processes and the three
    nats-servers spent in the throughput window, divided by the messages.
- channel: one message to a --channel member channel, members spread evenly over the three
  nodes (one worker process per node), the sender on node 1 (bench/channel_run.py's
  members, warm-up first): time to the last member, and p50.
- aggregate: k = 1, 2, 3 nodes, k pairs at once; pair i sends from node i to node i+1 (mod
  k), so with k > 1 every message crosses nodes. On this 2-core machine the clients, nodes,
  NATS and anvil share two cores, so the figure shows what a cross-node message costs,
  not how far more machines would scale.

Prints a markdown table and the plan for going past one machine, and writes
bench/results/cluster.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from benchlib import HOST, RESULTS_DIR, cpu_seconds, environment, finish, interrupt_on_sigterm, pct
from channel_members import member_worker
from channel_run import ChannelBench
from harness.node import NodeProcess

RESULTS = RESULTS_DIR / "cluster.json"
# Every user connects from 127.0.0.1, one address: --new-names-per-hour 0 lets it pin them all.
NODE_OPTIONS = {"log_level": "info", "batch_size": 1000, "batch_wait": 1, "max_connections": 5000,
                "new_names_per_hour": 0}
BATCH = 100  # messages per send_many in the throughput runs


def pair_worker(cfg: dict, commands, results) -> None:
    """A sender on cfg["from_port"] and a receiver on cfg["to_port"], in this process. After a
    warm-up it reports ("ready", ...), then runs one command: ("latency", n) or ("burst", n)."""
    from dm.client.core import ChatClient, Events

    data = Path(cfg["data_dir"])
    arrivals: dict[str, float] = {}
    cond = threading.Condition()

    def on_message(incoming) -> None:
        with cond:
            arrivals[incoming.text] = time.time()
            cond.notify_all()

    def wait_for(texts, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with cond:
            while not all(t in arrivals for t in texts):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{sum(t in arrivals for t in texts)} of {len(texts)} arrived")
                cond.wait(0.5)

    receiver = ChatClient(HOST, cfg["to_port"], cfg["receiver"], data, rpc_url=cfg["rpc_url"],
                          events=Events(message=on_message))
    receiver.connect()
    sender = ChatClient(HOST, cfg["from_port"], cfg["sender"], data, rpc_url=cfg["rpc_url"],
                        book_size=cfg["book"])
    sender.connect()
    try:
        deadline = time.monotonic() + 30
        while cfg["receiver"] not in sender.peers():  # presence reaches the sender's node
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cfg['receiver']} never showed up at the sender's node")
            time.sleep(0.1)
        sender.send_text(cfg["receiver"], "warm-up")  # opens the book, pins the keys
        wait_for(["warm-up"])
        results.put(("ready", cfg["index"], {"pid": os.getpid()}))
        kind, n = commands.get()
        out: dict = {"kind": kind, "messages": n}
        if kind == "latency":
            latencies = []
            for i in range(n):
                text = f"l{i}"
                t0 = time.time()
                sender.send_text(cfg["receiver"], text)
                wait_for([text], 30)
                latencies.append((arrivals[text] - t0) * 1e3)
            out["latencies_ms"] = latencies
        else:
            texts = [f"b{i}" for i in range(n)]
            out["t0"] = time.time()
            for start in range(0, n, BATCH):
                sender.send_many(cfg["receiver"], texts[start:start + BATCH])
            wait_for(texts)
            out["t_last"] = max(arrivals[t] for t in texts)
        sender.wait_acknowledged(30)
        results.put(("done", cfg["index"], out))
    finally:
        sender.close()
        receiver.close()


class ClusterBench(ChannelBench):
    """ChannelBench's chain, users and members, on three nodes joined over NATS; `self.node`
    is node 1, where every sender pays."""

    def start(self) -> None:
        from dm import crypto
        from dm.cluster.local import prepare_node_dir
        from dm.cluster.natsd import LocalNatsCluster

        chain = self.chain.start()
        shared = self.tmp / "shared-keys"
        shared.mkdir(mode=0o700)
        self.shared_keys = []
        for i in range(8):
            key = crypto.generate_private_key()
            private, public = shared / f"k{i}_PRIVATE.pem", shared / f"k{i}_PUBLIC.pem"
            crypto.save_private_key(private, key)
            crypto.save_public_key(public, key.public_key())
            self.shared_keys.append((private, public))
        self.funder = chain.funder()  # before the nodes' faucets: chain.faucet is not used after this
        self.nats = LocalNatsCluster(self.tmp / "nats", 3).start()
        self.nodes = []
        for i in range(3):
            node_dir = self.tmp / f"node{i + 1}"
            prepare_node_dir(chain.token, self.data, node_dir)
            self.nodes.append(NodeProcess(node_dir, chain.rpc_url, label=f"node{i + 1}",
                                          extra_args=("--cluster", self.nats.urls, "--cluster-timeout", "10"),
                                          **NODE_OPTIONS))
        for node in self.nodes:
            node.wait_ready()
        self.node = self.nodes[0]
        self.node_address = self.node.eth_address

    def stop(self) -> None:
        try:
            self.workers.reap(timeout=0)
            for node in getattr(self, "nodes", []):
                node.stop()
            self.node = None
            if getattr(self, "nats", None) is not None:
                self.nats.stop()
        finally:
            self.chain.stop()

    def cpu(self) -> dict:
        return {"nodes": sum(cpu_seconds(n.pid) for n in self.nodes),
                "nats": sum(cpu_seconds(s.proc.pid) for s in self.nats.servers if s.proc.poll() is None)}

    # --- pairs --------------------------------------------------------------------------

    def run_pairs(self, routes: list[tuple[int, int]], kind: str, n: int, tag: str) -> list[dict]:
        """One worker per (from node, to node) route, all started together."""
        names = [(f"{tag}s{i}", f"{tag}r{i}") for i in range(len(routes))]
        self.make_users([name for pair in names for name in pair], 0)
        commands, procs = [], []
        for i, ((src, dst), (s, r)) in enumerate(zip(routes, names)):
            commands.append(self.workers.ctx.Queue())
            cfg = {"index": i, "sender": s, "receiver": r, "from_port": self.nodes[src].port,
                   "to_port": self.nodes[dst].port, "rpc_url": self.chain.rpc_url, "data_dir": str(self.data),
                   "book": n + 10}
            procs.append(self.workers.spawn(pair_worker, f"pair {tag}{i}", cfg, commands[-1], self.results,
                                            results=self.results))
        try:
            self.wait_results("ready", len(routes), 180)
            cpu0 = self.cpu()
            for q in commands:
                q.put((kind, n))
            done = self.wait_results("done", len(routes), 600)
            cpu1 = self.cpu()
            for report in done.values():
                report["cpu_s"] = {k: cpu1[k] - cpu0[k] for k in cpu0}
            return [done[i] for i in range(len(routes))]
        finally:
            self.workers.reap(procs, timeout=10)

    def wait_known_everywhere(self, name: str, probe: str, timeout: float = 180) -> None:
        """Until every node answers a lookup of `name` (its pin reached them through the KV
        watch, behind the members' pins and joins): the warm-up measures delivery, not that."""
        from dm.client.core import ChatClient
        from dm.client.errors import ClientError

        self.make_users([f"{probe}_{i}" for i in range(1, len(self.nodes))], 2)
        deadline = time.monotonic() + timeout
        for i in range(1, len(self.nodes)):
            client = ChatClient(HOST, self.nodes[i].port, f"{probe}_{i}", self.data, rpc_url=self.chain.rpc_url)
            client.connect()
            try:
                while True:
                    try:
                        client.peer_key(name)
                        break
                    except ClientError:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"node {i + 1} never learned {name}'s pin") from None
                        time.sleep(1)
            finally:
                client.close()

    # --- the channel ----------------------------------------------------------------------

    def run_channel(self, n: int) -> dict:
        """bench/channel_run.py's run_size with the members spread over the three nodes."""
        channel, sender_name = f"#spread{n}", f"cs{n}"
        names = [f"c{n}_{i:04d}" for i in range(n)]
        out: dict = {"members": n}
        self.make_users(names + [sender_name], 1)
        commands, procs = [], []
        per_node = max(1, math.ceil(len(self.nodes)))
        for g in range(per_node):
            commands.append(self.workers.ctx.Queue())
            cfg = {"index": g, "names": names[g::per_node], "port": self.nodes[g % len(self.nodes)].port,
                   "rpc_url": self.chain.rpc_url, "data_dir": str(self.data), "channel": channel,
                   "switch_interval": None}
            procs.append(self.workers.spawn(member_worker, f"members {g}", cfg, commands[-1], self.results,
                                            results=self.results))
        sender = None
        try:
            t = time.perf_counter()
            ready = self.wait_results("ready", per_node, 600)
            out["connect_join_s"] = round(time.perf_counter() - t, 1)
            connected = sum(r["connected"] for r in ready.values())
            if connected != n:
                raise RuntimeError(f"only {connected} of {n} members connected: "
                                   f"{[s for r in ready.values() for s in r['failure_samples']]}")
            worker_pids = [r["pid"] for r in ready.values()]
            from channel_run import Sender
            sender = Sender(self.node.port, sender_name, self.data, self.chain.rpc_url, 2 * n)
            sender.client.join(channel)
            self.wait_known_everywhere(sender_name, f"probe{n}")
            deadline = time.monotonic() + 60  # membership reaches node 1 through the KV watch
            while len(sender.client._connection.request({"type": "members", "channel": channel})["online"]) < n + 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the channel's members did not all reach node 1")
                time.sleep(0.2)
            out["warmup"] = self.warm_up(sender, commands, channel, n)
            book = sender.client.payer._book
            out["book"] = self.open_book_gas(book.root, sender.client.eth_address)
            time.sleep(0.3)
            out.update(self.measure(sender, commands, channel, n, worker_pids, out["book"]))
            return out
        finally:
            self.stop_run(sender, commands, procs, 30)


def rate(reports: list[dict]) -> float:
    total = sum(r["messages"] for r in reports)
    return total / (max(r["t_last"] for r in reports) - min(r["t0"] for r in reports))


def report(out: dict) -> str:
    p = out["pairs"]
    lines = ["| delivery | messages/s | p50 latency (ms) | p99 latency (ms) | node + NATS CPU per message (us) |",
             "|---|---:|---:|---:|---:|"]
    for label, key in (("same node", "same"), ("cross node", "cross")):
        if key in p:
            r = p[key]
            lines.append(f"| {label} | {r['rate']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['cpu_us_per_message']:,.0f} |")
    if "channel" in out and "measured" in out["channel"]:
        m = out["channel"]["measured"]
        lines += ["", f"| one message to a channel of {out['channel']['members']:,} members on 3 nodes | ms |",
                  "|---|---:|", f"| first member | {m['first_ms']:,.0f} |", f"| p50 member | {m['p50_ms']:,.0f} |",
                  f"| last member | {m['to_last_ms']:,.0f} |",
                  f"| all codes redeemed by the sender's node | {m['all_redeemed_after_s'] * 1e3:,.0f} |"]
    if out.get("aggregate"):
        lines += ["", "| nodes | pairs (each to the next node) | aggregate messages/s |", "|---:|---:|---:|"]
        for k, r in sorted(out["aggregate"].items()):
            lines.append(f"| {k} | {k} | {r:,.0f} |")
    lines += ["", out["plan"]]
    return "\n".join(lines)


def plan(out: dict) -> str:
    """Going past one machine, from what was measured here."""
    p = out["pairs"]
    cross, same = p.get("cross"), p.get("same")
    if not (cross and same):
        return "plan: not enough measurements"
    extra_us = cross["cpu_us_per_message"] - same["cpu_us_per_message"]
    return (
        "Plan past one machine. Measured here: a cross-node message costs "
        f"{cross['cpu_us_per_message']:,.0f} us of node + NATS CPU against {same['cpu_us_per_message']:,.0f} us "
        f"on one node (+{extra_us:,.0f} us: the NATS request and reply, the JetStream claim on three replicas), "
        f"and adds {cross['p50_ms'] - same['p50_ms']:.2f} ms at p50. Estimated, not measured (one machine, two "
        "cores): give each relay node its own cores or machine and connect it to the nearest server of one "
        "3-server NATS cluster (JetStream R3: one server may fail). A core of node + NATS CPU carries about "
        f"{1e6 / max(cross['cpu_us_per_message'], 1):,.0f} cross-node messages/s at this cost, so a node's "
        "capacity is bounded by the share of its traffic that crosses nodes; keep users who talk together on "
        "one node where possible. NATS routes full-mesh between servers: grow to 5 servers per cluster for "
        "more connections, and past a few dozen relay nodes split into clusters joined by NATS superclusters "
        "(gateways), with pins and channels in one JetStream domain.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per pair in the throughput runs")
    parser.add_argument("--latency", type=int, default=200, help="messages sent one at a time for latency")
    parser.add_argument("--channel", type=int, default=1000, help="members of the spread channel (0: skip)")
    parser.add_argument("--skip-pairs", action="store_true", help="only the channel (no same/cross/aggregate runs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (node logs, data)")
    args = parser.parse_args(argv)
    interrupt_on_sigterm()
    started = time.perf_counter()
    out: dict = {"environment": environment(), "params": vars(args), "pairs": {}, "aggregate": {}}
    tmp = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    bench = ClusterBench(tmp)
    failed = None
    try:
        print("starting anvil, a 3-server NATS cluster and three node.py --cluster ...", flush=True)
        bench.start()
        for key, route in () if args.skip_pairs else (("same", (0, 0)), ("cross", (0, 1))):
            lat = bench.run_pairs([route], "latency", args.latency, f"{key}l")[0]["latencies_ms"]
            burst = bench.run_pairs([route], "burst", args.messages, f"{key}b")
            out["pairs"][key] = {
                "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "rate": rate(burst),
                "cpu_us_per_message": sum(burst[0]["cpu_s"].values()) / args.messages * 1e6,
                "cpu_s": burst[0]["cpu_s"]}
            print(f"{key} node: {out['pairs'][key]['rate']:,.0f} messages/s, p50 "
                  f"{out['pairs'][key]['p50_ms']:.2f} ms, p99 {out['pairs'][key]['p99_ms']:.2f} ms", flush=True)
        for k in () if args.skip_pairs else (1, 2, 3):
            reports = bench.run_pairs([(i, (i + 1) % k) for i in range(k)], "burst", args.messages, f"a{k}")
            out["aggregate"][k] = rate(reports)
            print(f"{k} node(s): {out['aggregate'][k]:,.0f} messages/s in aggregate", flush=True)
        if args.channel:
            print(f"a channel of {args.channel:,} members over three nodes ...", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                out["channel"] = bench.run_channel(args.channel)
            m = out["channel"]["measured"]
            print(f"  last member after {m['to_last_ms']:,.0f} ms (p50 {m['p50_ms']:,.0f} ms)", flush=True)
    except BaseException as exc:
        failed = exc
        traceback.print_exc()
        for node in getattr(bench, "nodes", []):
            node.print_tail(15)
    finally:
        bench.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out["plan"] = plan(out)
    return finish(out, started, failed, RESULTS, report(out))


if __name__ == "__main__":
    sys.exit(main())

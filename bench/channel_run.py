"""bench/channel.py's run: the chain and one node, N members over worker processes
(channel_members.py), a sender in this process, a warm-up message, then the measured one."""
from __future__ import annotations

import contextlib
import math
import secrets
import time
from pathlib import Path

from benchlib import HOST, context_switches, cpu_seconds, cpu_split, machine_busy, own_cpu, pct
from channel_members import member_worker
from dm import crypto, datadir
from dm.chain import devchain, ethereum
from dm.chain import faucet as dev_faucet
from dm.client.core import ChatClient, Events
from harness.chain import DevChain
from harness.node import NodeProcess
from harness.workers import Workers

RSA_KEYS = 8
PER_WORKER = 250  # member clients per worker process
# Every member connects from 127.0.0.1, one address: --new-names-per-hour 0 lets it pin them all.
NODE_OPTIONS = {"log_level": "info", "batch_size": 1000, "batch_wait": 2, "max_connections": 5000,
                "new_names_per_hour": 0}


def ms_after(t0: float, at: float | None) -> float | None:
    return None if at is None else round((at - t0) * 1e3, 1)


class Sender:
    """The channel's sender: a ChatClient in this process, with the times of its receipts and
    `paid` notices."""

    def __init__(self, port: int, name: str, data: Path, rpc_url: str, book_size: int):
        self.receipts: list[float] = []
        self.paid: list[tuple[float, int]] = []
        self.notices: list[str] = []
        events = Events(receipt=lambda msg_id, status, detail: self.receipts.append(time.time()),
                        paid=lambda msg_ids: self.paid.append((time.time(), len(msg_ids))),
                        notice=self.notices.append)
        self.client = ChatClient(HOST, port, name, data, rpc_url=rpc_url, book_size=book_size, events=events)
        self.client.connect()


class ChannelBench:
    def __init__(self, tmp: Path, switch_interval: float | None = None):
        self.tmp, self.switch_interval = tmp, switch_interval
        self.chain = DevChain(tmp / "data")
        self.data = self.chain.data
        self.workers = Workers()
        self.results = self.workers.ctx.Queue()
        self.node: NodeProcess | None = None

    def start(self) -> None:
        chain = self.chain.start()
        # A handful of RSA key pairs, shared across names (see channel.py's docstring).
        shared = self.tmp / "shared-keys"
        shared.mkdir(mode=0o700)
        self.shared_keys = []
        for i in range(RSA_KEYS):
            key = crypto.generate_private_key()
            private, public = shared / f"k{i}_PRIVATE.pem", shared / f"k{i}_PUBLIC.pem"
            crypto.save_private_key(private, key)
            crypto.save_public_key(public, key.public_key())
            self.shared_keys.append((private, public))
        self.funder = chain.funder()
        self.node = NodeProcess(self.data, chain.rpc_url, **NODE_OPTIONS).wait_ready()
        self.node_address = self.node.eth_address

    def stop(self) -> None:
        try:
            self.workers.reap(timeout=0)
            if self.node is not None:
                self.node.stop()
                self.node = None
        finally:
            self.chain.stop()

    def make_users(self, names: list[str], offset: int) -> None:
        """What main.py's create_users writes, with the RSA pair shared (symlinked) and a fresh
        Ethereum account per name. Every account is given what the node's dev-chain faucet
        would give a new user (100 ETH, 10,000 BTK) in one burst of transactions, so the
        node's funding check in each handshake finds nothing to send."""
        w3, token = self.chain.w3, self.chain.token
        addresses = []
        for i, name in enumerate(names):
            private, public = self.shared_keys[(offset + i) % len(self.shared_keys)]
            datadir.private_key_path(self.data, name).symlink_to(private)
            datadir.public_key_path(self.data, name).symlink_to(public)
            address, key = ethereum.new_account()
            datadir.write_secret(datadir.eth_key_path(self.data, name), key)
            addresses.append(address)
        last = None
        for address in addresses:
            w3.provider.make_request("anvil_setBalance", [address, hex(dev_faucet.USER_GRANT_ETH)])
            last = token.transfer(self.funder, address, dev_faucet.USER_GRANT_BTK, gas=100_000, wait=False)
        receipt = ethereum.wait_for(w3, last)
        if receipt["status"] != 1 or token.balance_of(addresses[0]) < dev_faucet.USER_GRANT_BTK:
            raise RuntimeError("pre-funding the bench accounts failed")

    def wait_results(self, kind: str, count: int, timeout: float) -> dict[int, dict]:
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"only {len(got)} of {count} workers reported {kind!r} in {timeout:.0f}s")
            item = self.workers.next_result(self.results, min(1.0, remaining))
            if item is not None and item[0] == kind:
                got[item[1]] = item[2]
        return got

    def collect(self, commands: list, text: str, timeout: float) -> tuple[dict, dict, list]:
        """(arrivals, not genuine, notices) of `text` over every member; self.on_deliver is then
        the members' (CPU seconds, calls) inside ChatClient._on_deliver so far."""
        for q in commands:
            q.put(("collect", text, timeout))
        reports = self.wait_results("arrivals", len(commands), timeout + 30)
        self.on_deliver = (sum(r["on_deliver_cpu"] for r in reports.values()),
                           sum(r["on_deliver_calls"] for r in reports.values()))
        arrivals, bad, notices = {}, {}, []
        for report in reports.values():
            arrivals.update(report["arrivals"])
            bad.update(report["not_genuine"])
            notices += report["notices"]
        return arrivals, bad, notices

    def earned(self, before: int) -> int:
        return int((self.chain.token.balance_of(self.node_address) - before) // ethereum.TOKEN)

    def wait_earned(self, before: int, count: int, timeout: float) -> tuple[int, float]:
        deadline = time.monotonic() + timeout
        while True:
            earned = self.earned(before)
            if earned >= count or time.monotonic() > deadline:
                return earned, time.time()
            time.sleep(0.05)

    def open_book_gas(self, root: bytes, sender_address: str) -> dict:
        token = self.chain.token
        logs = token.contract.events.BookOpened().get_logs(
            argument_filters={"root": root, "sender": sender_address}, from_block=self.chain.deployment.deploy_block,
            to_block="latest")
        if len(logs) != 1:
            raise RuntimeError(f"expected one BookOpened for {root.hex()[:12]}, found {len(logs)}")
        receipt = self.chain.w3.eth.get_transaction_receipt(logs[0]["transactionHash"])
        return {"gas": receipt["gasUsed"], "size": logs[0]["args"]["size"],
                "tx": "0x" + logs[0]["transactionHash"].hex().removeprefix("0x")}

    def cpu_sample(self, worker_pids: list[int]) -> dict:
        return {"node": cpu_seconds(self.node.pid), "main_process_sender": own_cpu(),
                "workers": sum(cpu_seconds(p) for p in worker_pids),
                "anvil": cpu_seconds(self.chain.pid), "machine": machine_busy()[0],
                "workers_system": sum(cpu_split(p)[1] for p in worker_pids),
                "workers_ctx_switches": sum(context_switches(p) for p in worker_pids)}

    def run_size(self, n: int, offset: int) -> dict:
        channel, sender_name = f"#bench{n}", f"s{n}"
        names = [f"m{n}_{i:04d}" for i in range(n)]
        out: dict = {"members": n, "channel": channel}
        t = time.perf_counter()
        self.make_users(names + [sender_name], offset)
        out["key_files_s"] = round(time.perf_counter() - t, 2)

        # Members, over a few processes.
        t = time.perf_counter()
        groups = max(1, math.ceil(n / PER_WORKER))
        commands, procs = [], []
        for g in range(groups):
            commands.append(self.workers.ctx.Queue())
            cfg = {"index": g, "names": names[g::groups], "port": self.node.port, "rpc_url": self.chain.rpc_url,
                   "data_dir": str(self.data), "channel": channel, "switch_interval": self.switch_interval}
            procs.append(self.workers.spawn(member_worker, f"worker {g}", cfg, commands[-1], self.results,
                                            results=self.results))
        sender = None
        try:
            ready = self.wait_results("ready", groups, 240)
            connected = sum(r["connected"] for r in ready.values())
            out["workers"] = groups
            out["connect_join_s"] = round(time.perf_counter() - t, 2)
            if connected != n:
                samples = [s for r in ready.values() for s in r["failure_samples"]]
                raise RuntimeError(f"only {connected} of {n} members connected: {samples}")
            worker_pids = [r["pid"] for r in ready.values()]

            # The sender: a book of 2N leaves pays for the warm-up and the measured message.
            sender = Sender(self.node.port, sender_name, self.data, self.chain.rpc_url, 2 * n)
            sender.client.join(channel)
            out["warmup"] = self.warm_up(sender, commands, channel, n)
            book = sender.client.payer._book
            out["book"] = self.open_book_gas(book.root, sender.client.eth_address)
            time.sleep(0.3)  # let the node's redeemer and the members' claim writes settle
            out.update(self.measure(sender, commands, channel, n, worker_pids, out["book"]))
            if sender.client.payer._book.root != book.root or sender.client.payer.books_opened != 1:
                raise RuntimeError("the measured message did not come from the warm-up's book")
            return out
        finally:
            self.stop_run(sender, commands, procs, 20)

    def stop_run(self, sender: "Sender | None", commands: list, procs, wait: float) -> None:
        """End one size's run: close the sender, stop the member workers, reap them."""
        if sender is not None:
            sender.client.close()
        for q in commands:
            q.put(("stop",))
        with contextlib.suppress(RuntimeError):
            self.wait_results("stopped", len(commands), wait)
        self.workers.reap(procs, timeout=5)

    def warm_up(self, sender: "Sender", commands: list, channel: str, n: int) -> dict:
        """Opens the book, pins keys, wraps session keys; members look the sender up once. Waits
        for every member and for the node to redeem every code."""
        before = self.chain.token.balance_of(self.node_address)
        text = f"warm-up {secrets.token_hex(4)}"
        t0 = time.time()
        msg_ids, offline = sender.client.send_to_channel(channel, text)
        sealed = time.time()
        arrivals, bad, member_notices = self.collect(commands, text, 120)
        times = [a[0] for a in arrivals.values() if a[1]]
        problems = sorted({a[2] for a in bad.values()})[:5] + member_notices[:5] + sender.notices[:5]
        warmup = {"sent": len(msg_ids), "offline": len(offline), "delivered": len(times),
                  "send_to_channel_ms": ms_after(t0, sealed),
                  "to_last_ms": ms_after(t0, max(times) if times else None),
                  "p50_ms": ms_after(t0, pct(times, 50) if times else None),
                  "not_genuine": len(bad), "problems": problems}
        if len(times) != n:
            raise RuntimeError(f"the warm-up reached {len(times)} of {n} members: {warmup}")
        warmup["redeemed"], _ = self.wait_earned(before, n, 90)
        if warmup["redeemed"] < n:
            raise RuntimeError(f"the node redeemed only {warmup['redeemed']} of the warm-up's {n} codes "
                               f"(warm-up: {warmup})")
        return warmup

    def measure(self, sender: "Sender", commands: list, channel: str, n: int, worker_pids: list[int],
                book: dict) -> dict:
        """ONE message to the channel: t0 just before send_to_channel, then every member's arrival,
        the node's redemption log lines and its BTK balance."""
        warm_deliver = self.on_deliver
        receipts, paid = sender.receipts, sender.paid
        receipts.clear()
        paid.clear()
        mark = self.node.mark()
        before = self.chain.token.balance_of(self.node_address)
        cpu0 = self.cpu_sample(worker_pids)
        text = f"measured {secrets.token_hex(4)}"
        t0 = time.time()
        msg_ids, offline = sender.client.send_to_channel(channel, text)
        sealed = time.time()
        arrivals, bad, member_notices = self.collect(commands, text, 60)
        collected = time.time()
        cpu1 = self.cpu_sample(worker_pids)
        genuine = sorted(a[0] for a in arrivals.values() if a[1] and a[3] == channel and a[4] == sender.client.me)
        sender.client.wait_acknowledged(10)
        earned, all_redeemed_at = self.wait_earned(before, n, 90)
        time.sleep(0.3)  # the log line is written just after the receipt
        redemptions = self.node.redemptions(mark)
        redeem_gas = sum(r["gas"] for r in redemptions)
        redeemed_codes = sum(r["codes"] for r in redemptions)
        delivered, used = len(genuine), len(msg_ids)
        book_gas_share = book["gas"] * used / book["size"]
        out = {"measured": {
            "sent": used, "offline": len(offline), "delivered": delivered, "not_genuine": len(bad),
            "send_to_channel_ms": ms_after(t0, sealed),
            "last_receipt_ms": ms_after(t0, max(receipts) if receipts else None), "receipts": len(receipts),
            "first_ms": ms_after(t0, genuine[0] if genuine else None),
            "p50_ms": ms_after(t0, pct(genuine, 50) if genuine else None),
            "p90_ms": ms_after(t0, pct(genuine, 90) if genuine else None),
            "to_last_ms": ms_after(t0, genuine[-1] if genuine else None),
            "cpu_s_during": {k: round(cpu1[k] - cpu0[k], 3) for k in cpu0},
            "window_s": round(collected - t0, 3),
            "members_on_deliver_cpu_s": round(self.on_deliver[0] - warm_deliver[0], 3),
            "all_redeemed_after_s": round(all_redeemed_at - t0, 2),
            "node_btk_earned": earned, "redemptions": redemptions,
            "redeemed_codes_in_log": redeemed_codes, "redeem_gas": redeem_gas,
            "paid_notices": sum(c for _, c in paid), "member_notices": member_notices[:5],
            "sender_notices": sender.notices[:5]}}
        per_copy = (lambda gas: round(gas / delivered, 1) if delivered else None)  # noqa: E731
        out["gas_per_copy"] = {"redeem": per_copy(redeem_gas), "book": per_copy(book_gas_share),
                               "total": per_copy(redeem_gas + book_gas_share),
                               "book_if_sized_n": round(book["gas"] / n, 1)}
        if redeemed_codes != delivered or earned < delivered:
            out["gas_warning"] = (f"log shows {redeemed_codes} redeemed codes and the node earned {earned} BTK "
                                  f"for {delivered} deliveries")
        return out

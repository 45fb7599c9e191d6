"""What every phase of bench/relay.py shares: the chain, the RSA keys, a fresh node per phase,
the worker processes, and the envelope and book every sender uses."""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import time
from pathlib import Path

from benchlib import RESULTS_DIR, ROOT, raise_nofile
from harness.chain import DevChain
from harness.node import NodeProcess, profile_summary
from harness.workers import Workers

PAIRS = 4
ENVELOPE_SIZE = 512
UNBOUNDED = ["--max-unclaimed", str(10**9), "--max-book-leaves", str(10**6), "--cpu-share", "0",
             "--new-names-per-hour", "0"]
RSA_KEYS = 8  # shared across the many connection names (the node pins name -> key, not key -> name)

raise_nofile()  # at import: the main process and every spawned worker


def make_envelope(sender: str, recipient: str, size: int = ENVELOPE_SIZE) -> dict:
    """An envelope with seal()'s fields and random base64 contents, `size` bytes serialized (+-3).
    (A real RSA-2048 envelope of a short text is ~1,000 bytes: 256-byte wrapped key and
    signature. 512 bytes here is the benchmark's stated message size.)"""
    def b64(n: int) -> str:
        return base64.b64encode(secrets.token_bytes(n)).decode()

    envelope = {"from": sender, "to": recipient, "msg_id": secrets.token_hex(16), "ts": int(time.time()),
                "wrapped_key": b64(128), "nonce": b64(12), "code_slot": b64(32), "digest": b64(32), "ciphertext": "",
                "signature": b64(128)}
    room = size - len(json.dumps(envelope, separators=(",", ":")))
    envelope["ciphertext"] = b64(max(0, room // 4) * 3)
    return envelope


def open_and_announce(wire, rpc_url: str, contract: str, eth_key: str, node_address: str, size: int):
    """A real book of `size` leaves, opened on chain for the node and announced; returns (book, seconds)."""
    from dm.chain import ethereum
    from dm.chain.books import BookSecrets

    started = time.perf_counter()
    w3 = ethereum.connect(rpc_url)
    token = ethereum.BountyToken(w3, contract)
    book = BookSecrets.generate(size)
    chain_now = max(int(time.time()), w3.eth.get_block("latest")["timestamp"])
    token.open_book(ethereum.Signer(w3, eth_key), book.root, size, node_address, chain_now + 86_400)
    wire.write({"type": "book", "root": book.root.hex(), "leaves": [leaf.hex() for leaf in book.leaf_hashes]})
    ack = wire.expect("book")
    if ack.get("size") != size:
        raise RuntimeError(f"the node acknowledged a book of {ack.get('size')} leaves, not {size}")
    return book, time.perf_counter() - started


class RelayBench:
    """start() brings up the chain and the keys; node(phase) a fresh node; stop() ends every process."""

    def __init__(self, args, sizes: dict, tmp: Path):
        self.args, self.sizes, self.tmp = args, sizes, tmp
        self.chain = DevChain(tmp / "data")
        self.workers = Workers()
        self.nodes: list[NodeProcess] = []
        # The node alone: on a machine with 2+ CPUs the node gets the first and the load
        # generators the others, so the figures measure the node, not where the scheduler
        # happened to put it next to eight busy clients (unpinned runs vary 75-95k msg/s here).
        cpus = sorted(os.sched_getaffinity(0))
        pin = not args.no_pin and len(cpus) >= 2
        self.node_cpus = {cpus[0]} if pin else None
        self.client_cpus = set(cpus[1:]) if pin else None

    def start(self) -> None:
        from dm import crypto

        self.chain.start()
        self.key_paths, self.pems = [], []
        keys_dir = self.tmp / "bench-keys"
        keys_dir.mkdir(mode=0o700)
        for i in range(RSA_KEYS):
            key = crypto.generate_private_key()
            path = keys_dir / f"k{i}.pem"
            crypto.save_private_key(path, key)
            self.key_paths.append(str(path))
            self.pems.append(crypto.public_key_pem(key))
        # Receivers and connection holders present this address; funded, so the node's faucet stays idle.
        self.sink_address, _ = self.chain.account()

    def node(self, phase: str, *, pins: dict | None = None, profiled: bool = True, batch_size: int = 1_000_000,
             batch_wait: float = 3600, **options) -> NodeProcess:
        """A fresh node per phase, on a data directory of its own (same chain and contract), so no
        pending deliveries are left over from the phase before. The default batching never redeems
        while measuring. With --profile it runs under cProfile (bench/results/relay-node-PHASE.prof).
        The node's per-user bounds are lifted (UNBOUNDED): the receivers never return codes, and
        each sender announces one book of up to 100,000 leaves, whose hashing would otherwise be
        paced by the per-connection CPU share, and every name is pinned from 127.0.0.1. The
        per-message path is the same either way."""
        data = self.tmp / f"node-{phase}"
        (data / "node").mkdir(parents=True, mode=0o700)
        shutil.copy(self.chain.data / "deployment.json", data / "deployment.json")
        if pins:
            (data / "node" / "pins.json").write_text(json.dumps(pins))
        profile = RESULTS_DIR / f"relay-node-{phase}.prof" if profiled and self.args.profile else None
        options.setdefault("extra_args", UNBOUNDED)
        node = NodeProcess(data, self.chain.rpc_url, label=f"node-{phase}", batch_size=batch_size,
                           batch_wait=batch_wait, profile=profile, profile_clock=self.args.profile_clock, **options)
        self.nodes.append(node)
        return node.wait_ready()

    def done_with(self, node: NodeProcess, phase: str, out: dict) -> None:
        """Stop the phase's node; under --profile, print its top functions and record them in `out`."""
        node.stop(timeout=120 if node.profile else 30)
        if node.profile is not None and node.profile.exists():
            text, rows = profile_summary(node.profile)
            out.setdefault("profile", {})[phase] = {"file": str(node.profile.relative_to(ROOT)),
                                                    "clock": self.args.profile_clock, "top_tottime": rows}
            print(text, flush=True)

    def print_node_logs(self) -> None:
        for node in self.nodes:
            node.print_tail()

    def stop(self) -> None:
        try:
            self.workers.reap(timeout=0)
            for node in self.nodes:
                node.stop(timeout=10)
        finally:
            self.chain.stop()

"""A network of relay nodes on one machine: data directories and node.py processes, for the
tests, `make cluster-demo` and bench/cluster.py. Every node is a real `node.py --cluster`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from dm import PROJECT_ROOT
from dm.chain import devchain, ethereum
from dm.chain.faucet import faucet_signer, fund_user

NODE_FAUCET_BTK = 1_000_000 * ethereum.TOKEN  # what each node's own faucet gets for its new users


def prepare_node_dir(token: ethereum.BountyToken, chain_data_dir: Path, node_dir: Path) -> None:
    """A data directory for one node on the chain recorded in `chain_data_dir`: the same
    deployment record, and a faucet of its own (one key per process: one nonce sequence),
    funded from the chain's faucet."""
    node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy(devchain.deployment_path(chain_data_dir), devchain.deployment_path(node_dir))
    own = faucet_signer(token.w3, node_dir)
    fund_user(token, faucet_signer(token.w3, chain_data_dir), own.address, btk=NODE_FAUCET_BTK)


class NodeProcess:
    """One `node.py --cluster` subprocess; its log lines are kept in `lines`."""

    def __init__(self, data_dir: Path, rpc_url: str, nats_urls: str, port: int, *extra: str,
                 env: dict | None = None):
        self.data_dir, self.rpc_url, self.nats_urls, self.port, self.extra = data_dir, rpc_url, nats_urls, port, extra
        self.env = env or {}  # added to this process's environment (tests: DM_TEST_* hooks); a restart rereads it
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.ready = threading.Event()

    def start(self) -> "NodeProcess":
        self.ready.clear()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "node.py", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir",
             str(self.data_dir), "--rpc-url", self.rpc_url, "--cluster", self.nats_urls, *self.extra],
            cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        return self

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("node ready"):
                self.ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node.py on port {self.port} did not start: " + " | ".join(self.lines[-8:]))

    @property
    def address(self) -> str:
        from dm import datadir
        return ethereum.address_of(datadir.read_secret(self.data_dir / "node" / "node_ETH.key"))

    def signal_stop(self, kill: bool = False) -> None:
        """Ask it to stop (SIGTERM: it redeems what is queued), or SIGKILL it; don't wait."""
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal_stop(kill)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

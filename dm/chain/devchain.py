"""The local development chain: start anvil when nothing answers, deploy
BountyToken once, remember the deployment, and fund new users.

anvil comes from the npm package @foundry-rs/anvil (installed by `npm ci`).
Its state is kept in DATA/chain/anvil-state.json, so a restarted chain keeps
balances and open bounties. The faucet is an account of our own, created in
the data directory and given ETH with anvil_setBalance: no well-known dev key
is ever used.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from web3 import Web3

from dm import PROJECT_ROOT, datadir
from dm.chain import ethereum, faucet

ROOT = PROJECT_ROOT
ANVIL_BINARIES = (
    ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil",
    ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-arm64" / "bin" / "anvil",
    ROOT / "node_modules" / "@foundry-rs" / "anvil-darwin-arm64" / "bin" / "anvil",
    ROOT / "node_modules" / "@foundry-rs" / "anvil-darwin-amd64" / "bin" / "anvil",
)
INITIAL_SUPPLY = 1_000_000_000 * ethereum.TOKEN


@dataclass
class Deployment:
    chain_id: int
    rpc_url: str
    address: str
    deploy_block: int

    def to_json(self) -> dict:
        return {"chain_id": self.chain_id, "rpc_url": self.rpc_url, "address": self.address,
                "deploy_block": self.deploy_block}


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def anvil_binary() -> str:
    for path in ANVIL_BINARIES:
        if path.exists():
            return str(path)
    found = shutil.which("anvil")
    if found:
        return found
    raise ethereum.ChainError("anvil is not installed: run `npm ci` in the project folder")


class Anvil:
    """An anvil process that we started, with its state file."""

    def __init__(self, url: str, state_file: Path, log_file: Path):
        parsed = urlparse(url)
        self.url = url
        state_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [anvil_binary(), "--host", parsed.hostname or "127.0.0.1", "--port", str(parsed.port or 8545),
               "--state", str(state_file), "--state-interval", "1", "--accounts", "1", "--silent"]
        self._log = open(log_file, "ab")
        # Its own session: a Ctrl-C or a closed terminal reaches us, and we stop anvil cleanly. Should we
        # die without doing so (SIGKILL), the kernel stops it for us.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=stop_with_this_process())

    def wait_ready(self, timeout: float = 30) -> Web3:
        deadline = time.monotonic() + timeout
        w3 = ethereum.connect(self.url)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ethereum.ChainError(f"anvil exited with code {self.proc.returncode}; see {self._log.name}")
            if ethereum.is_connected(w3):
                return w3
            time.sleep(0.05)
        self.stop()
        raise ethereum.ChainError(f"anvil did not answer on {self.url} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # anvil dumps its state on SIGTERM
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_this_process():
    """A preexec_fn under which a child gets SIGTERM (anvil saves its state on it) when this
    process dies, even by SIGKILL; None where Linux's prctl is not available.

    The kernel sends it when the *thread* that forked the child ends, so it is only set from
    the main thread (the one that lives as long as the process); a chain started from another
    thread is stopped by Anvil.stop() alone."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not our handler, until exec resets it anyway
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: nobody will send it
            os._exit(1)

    return in_child


def port_is_open(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 80), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_chain(url: str, data_dir: Path, start: bool = True) -> tuple[Web3, Anvil | None]:
    """Connect to `url`; when it is on loopback and nothing answers, start anvil there.
    Returns the Web3 and the Anvil we started (None if the chain was already up)."""
    w3 = ethereum.connect(url)
    if url == ethereum.TESTER_URL or ethereum.is_connected(w3):
        return w3, None
    if not (start and is_loopback(url)) or port_is_open(url):
        raise ethereum.ChainError(f"no Ethereum node answers at {url}")
    chain_dir = data_dir / "chain"
    anvil = Anvil(url, chain_dir / "anvil-state.json", chain_dir / "anvil.log")
    try:
        return anvil.wait_ready(), anvil
    except ethereum.ChainError:
        # Someone else may have started a chain on that port meanwhile.
        if ethereum.is_connected(w3):
            return w3, None
        raise





def deployment_path(data_dir: Path) -> Path:
    return data_dir / "deployment.json"


def load_deployment(data_dir: Path) -> Deployment | None:
    try:
        return Deployment(**json.loads(deployment_path(data_dir).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def ensure_deployment(w3: Web3, url: str, data_dir: Path) -> tuple[ethereum.BountyToken, Deployment]:
    """The recorded BountyToken if its code is still on this chain; otherwise
    (on a dev chain) deploy it now and record it."""
    artifact = ethereum.load_artifact()
    chain_id = w3.eth.chain_id
    record = load_deployment(data_dir)
    if record and record.chain_id == chain_id:
        token = ethereum.BountyToken(w3, record.address, artifact)
        if token.is_genuine():
            return token, record
    if not ethereum.is_dev_chain(w3):
        raise ethereum.ChainError(f"no BountyToken recorded for chain {chain_id}; deploy one and record it in "
                            f"{deployment_path(data_dir)}")
    token, receipt = ethereum.BountyToken.deploy(faucet.faucet_signer(w3, data_dir), INITIAL_SUPPLY, artifact)
    record = Deployment(chain_id, url, token.address, receipt["blockNumber"])
    datadir.write_json(deployment_path(data_dir), record.to_json())
    return token, record


def stop_on_exit(anvil: Anvil | None) -> None:
    if anvil is not None:
        anvil.stop()

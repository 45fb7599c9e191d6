"""The benchmarks' chain: anvil started by dm.chain.devchain on a free loopback port with a
throwaway data directory, BountyToken deployed there, and accounts funded from its faucet."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from benchlib import HOST
from dm.chain import devchain
from dm.chain import faucet as dev_faucet
from dm.chain import ethereum
from dm.net import free_port


class DevChain:
    """Use as `with DevChain(data) as chain:`, or call start() and stop() (stop is always safe)."""

    def __init__(self, data: Path):
        self.data = data
        self.anvil: devchain.Anvil | None = None

    def start(self) -> "DevChain":
        self.data.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.rpc_url = f"http://{HOST}:{free_port(HOST)}"
        self.w3, self.anvil = devchain.ensure_chain(self.rpc_url, self.data)
        if self.anvil is None:
            raise RuntimeError(f"something already answers on {self.rpc_url}; not benchmarking a foreign chain")
        # ensure_deployment signs with a faucet Signer of its own: ours comes after it (nonces).
        self.token, self.deployment = devchain.ensure_deployment(self.w3, self.rpc_url, self.data)
        self.faucet = dev_faucet.faucet_signer(self.w3, self.data)
        return self

    @property
    def pid(self) -> int:
        return self.anvil.proc.pid

    def account(self, btk: int = 10_000, eth: int = 100) -> tuple[str, str]:
        """A fresh Ethereum account holding `btk` BTK and `eth` ETH; returns (address, key)."""
        address, key = ethereum.new_account()
        dev_faucet.fund_user(self.token, self.faucet, address, btk=btk * ethereum.TOKEN, eth=eth * 10**18)
        return address, key

    def funder(self, btk: int = 100_000_000, eth: int = 1_000_000) -> ethereum.Signer:
        """An account of our own that can fund many others. Not the faucet: a node on this data
        directory signs with the faucet too, and two signers of one account race for nonces."""
        address, key = ethereum.new_account()
        dev_faucet.give_eth(self.w3, address, eth * 10**18)
        self.token.transfer(self.faucet, address, btk * ethereum.TOKEN)
        return ethereum.Signer(self.w3, key)

    def stop(self) -> None:
        """anvil gets SIGTERM (it saves its state) and its process group a SIGKILL after that."""
        if self.anvil is None:
            return
        try:
            self.anvil.stop()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.anvil.proc.pid, signal.SIGKILL)
            self.anvil = None

    def __enter__(self) -> "DevChain":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

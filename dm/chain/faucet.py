"""The dev faucet: gas money and BTK for new users on a local chain, so nobody needs a manual step.

On a real chain it does nothing. The node gives a new user its grant before `welcome` (the user
must be able to pay at once) and tops returning users up in the background.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from pathlib import Path

from web3 import Web3

from dm import datadir
from dm.chain import ethereum

log = logging.getLogger("node")
USER_GRANT_BTK = 10_000 * ethereum.TOKEN  # what a new user is given on a dev chain
USER_GRANT_ETH = 100 * 10**18  # gas money on a dev chain
# A returning user is looked at no more often than this: each look is two chain calls (milliseconds
# of the node's CPU), and a client that logs in again and again must not queue one per login.
TOP_UP_INTERVAL = 10.0


def give_eth(w3: Web3, address: str, amount: int) -> None:
    """Gas money on a dev chain: anvil_setBalance on anvil, a transfer on eth-tester."""
    address = Web3.to_checksum_address(address)
    if w3.eth.chain_id == 31337:
        balance = w3.eth.get_balance(address)
        w3.provider.make_request("anvil_setBalance", [address, hex(balance + amount)])
    else:
        tx_hash = w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": address, "value": amount})
        ethereum.wait_for(w3, tx_hash)


def faucet_signer(w3: Web3, data_dir: Path) -> ethereum.Signer:
    key = datadir.ensure_secret(data_dir / "chain" / "faucet.key", lambda: ethereum.new_account()[1])
    signer = ethereum.Signer(w3, key)
    if w3.eth.get_balance(signer.address) < 10**18:
        give_eth(w3, signer.address, 10_000 * 10**18)
    return signer


def fund_user(token: ethereum.BountyToken, faucet: ethereum.Signer, address: str,
              btk: int = USER_GRANT_BTK, eth: int = USER_GRANT_ETH) -> bool:
    """On a dev chain, top up `address` with gas and BTK when it runs low.
    Returns whether anything was sent."""
    w3 = token.w3
    if not ethereum.is_dev_chain(w3):
        return False
    sent = False
    if w3.eth.get_balance(address) < eth // 10:
        give_eth(w3, address, eth)
        sent = True
    if token.balance_of(address) < btk // 10:
        token.transfer(faucet, address, btk)
        sent = True
    return sent


class Faucet:
    """Funds users on a dev chain.

    Thread-safety: fund_now() runs on the caller's thread and top_up_later() only queues for
    the one worker thread; both may run at once, which is safe because the Signer hands out
    nonces under its own lock. `_queued` (name -> when it was last queued, oldest first) is
    read and written under `_lock` by the connection threads."""

    def __init__(self, token: ethereum.BountyToken, signer: ethereum.Signer, clock=time.monotonic):
        self.token, self.signer, self.clock = token, signer, clock
        self._queue: queue.Queue = queue.Queue()
        self._queued: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._worker, name="topups", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def fund_now(self, name: str, address: str) -> None:
        try:
            if fund_user(self.token, self.signer, address):
                log.info("funded %s on the dev chain", name)
        except (ethereum.ChainError, ValueError, OSError) as exc:
            log.warning("could not fund %s: %s", name, exc)

    def top_up_later(self, name: str, address: str) -> None:
        """Queue a look at `name`'s balance, unless one was queued in the last TOP_UP_INTERVAL."""
        now = self.clock()
        with self._lock:
            queued = self._queued
            while queued and now - next(iter(queued.values())) >= TOP_UP_INTERVAL:
                queued.popitem(last=False)  # oldest first: what is left is one per recent name
            if name in queued:
                return
            queued[name] = now
        self._queue.put((name, address))

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                name, address = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self.fund_now(name, address)

"""The chain: connect, load the artifact, deploy, and the BountyToken calls.

Every transaction is signed locally with the account's own key. Reverts come
back as `ContractRevert`, which names the contract's custom error and its
arguments (e.g. ``AlreadyRedeemed(codeHash=0x12..)``).
"""
from __future__ import annotations

import ast
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_utils import function_abi_to_4byte_selector
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError, ContractPanicError, Web3Exception

from dm import PROJECT_ROOT
from dm.chain import DEFAULT_RPC_URL, books

__all__ = ["ARTIFACT_PATH", "DEFAULT_RPC_URL", "TESTER_URL", "TOKEN", "BOUNTY_STATES", "ChainError", "ContractRevert",
           "connect", "is_connected", "load_artifact", "new_account", "address_of", "BountyInfo", "BookInfo", "Signer",
           "BountyToken", "wait_for", "code_hash", "DEV_CHAIN_IDS", "is_dev_chain"]

ARTIFACT_PATH = PROJECT_ROOT / "artifacts" / "BountyToken.json"
TESTER_URL = "tester://"  # an in-process eth-tester chain (py-evm)
TOKEN = 10**18  # BTK has 18 decimals
BOUNTY_STATES = ("none", "open", "redeemed", "refunded")
DEV_CHAIN_IDS = (31337, 131277322940537)  # anvil's, and eth-tester's


class ChainError(Exception):
    """A chain operation failed; the message is written for the user."""


class ContractRevert(ChainError):
    """The contract reverted with a custom error."""

    def __init__(self, name: str, args: dict[str, Any]):
        self.name = name
        self.args_by_name = args
        shown = ", ".join(f"{k}={_show(v)}" for k, v in args.items())
        super().__init__(f"{name}({shown})")


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


def connect(url: str = DEFAULT_RPC_URL, timeout: float = 30) -> Web3:
    """A Web3 for an http(s)/ws(s) JSON-RPC URL, or `tester://` for eth-tester in-process."""
    if url == TESTER_URL:
        return Web3(_LockedTesterProvider())
    if url.startswith(("http://", "https://")):
        return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}))
    if url.startswith(("ws://", "wss://")):
        from web3 import LegacyWebSocketProvider

        return Web3(LegacyWebSocketProvider(url, websocket_timeout=timeout))
    raise ChainError(f"unsupported RPC URL {url!r}: use http://, https://, ws://, wss:// or {TESTER_URL}")


def _LockedTesterProvider():
    """eth-tester's py-evm is not thread-safe; the node calls it from several threads."""
    from web3 import EthereumTesterProvider

    class LockedTesterProvider(EthereumTesterProvider):
        _lock = threading.RLock()

        def make_request(self, method, params):
            with self._lock:
                return super().make_request(method, params)

    return LockedTesterProvider()


def is_connected(w3: Web3) -> bool:
    try:
        return w3.is_connected()
    except Exception:  # any transport failure means "not reachable"
        return False


def load_artifact(path: Path = ARTIFACT_PATH) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ChainError(f"{path} is missing: run `python3 -m dm.chain.build`") from None


def new_account() -> tuple[str, str]:
    """A fresh (address, private key hex)."""
    account = Account.create()
    return account.address, account.key.hex()


def address_of(private_key: str) -> str:
    return Account.from_key(private_key).address


try:  # eth-tester reports reverts with its own exception, not web3's
    from eth_tester.exceptions import TransactionFailed as _TesterRevert
except ImportError:  # pragma: no cover - eth-tester is in requirements.txt
    _TesterRevert = ContractLogicError
_REVERTS = (ContractCustomError, ContractPanicError, ContractLogicError, _TesterRevert)


_BYTES_REPR = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


def _revert_data(exc: BaseException | None) -> bytes | str | None:
    """The raw revert bytes, wherever the provider put them: web3 sets `.data`;
    eth-tester re-raises with a text message and keeps the bytes on the cause."""
    seen = 0
    while exc is not None and seen < 5:
        data = getattr(exc, "data", None)
        if isinstance(data, (bytes, str)) and data:
            return data
        for arg in exc.args:
            if isinstance(arg, bytes):
                return arg
            if isinstance(arg, str):  # eth-tester's eth_call path keeps only the bytes' repr
                found = _BYTES_REPR.search(arg)
                if found:
                    try:
                        return ast.literal_eval(found.group(0))
                    except (ValueError, SyntaxError):
                        pass
            if isinstance(arg, BaseException):
                inner = _revert_data(arg)
                if inner:
                    return inner
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class _RevertDecoder:
    """Maps a revert's 4-byte selector to the ABI's custom error."""

    def __init__(self, abi: list[dict]):
        self._errors = {
            function_abi_to_4byte_selector(entry): entry for entry in abi if entry.get("type") == "error"
        }

    def decode(self, data: str | bytes | None) -> ContractRevert | None:
        if isinstance(data, str):
            data = bytes.fromhex(data.removeprefix("0x"))
        if not data or len(data) < 4 or data[:4] not in self._errors:
            return None
        entry = self._errors[data[:4]]
        types = [inp["type"] for inp in entry["inputs"]]
        try:
            values = abi_decode(types, data[4:])
        except Exception:
            return None
        return ContractRevert(entry["name"], {inp["name"]: v for inp, v in zip(entry["inputs"], values)})


@dataclass(frozen=True)
class BountyInfo:
    sender: str
    relayer: str
    expiry: int
    state: str  # none | open | redeemed | refunded


@dataclass(frozen=True)
class BookInfo:
    sender: str
    relayer: str
    expiry: int
    size: int
    spent: int
    refunded: bool


class Signer:
    """One account's transactions: local signing and a local nonce, so that
    many transactions can be in flight without a nonce round trip each."""

    def __init__(self, w3: Web3, private_key: str):
        self.w3 = w3
        self._account = Account.from_key(private_key)
        self.address = self._account.address
        self._nonce: int | None = None
        self._lock = threading.Lock()
        self._chain_id: int | None = None
        self.last_nonce: int | None = None  # the nonce of the last transaction sent

    def _fees(self) -> dict:
        base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas", 0)
        tip = 10**9
        return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * base_fee + tip}

    def _sign_next(self, tx: dict):
        """Sign with the next local nonce (with self._lock held)."""
        if self._nonce is None:
            self._nonce = self.w3.eth.get_transaction_count(self.address, "pending")
        if self._chain_id is None:
            self._chain_id = self.w3.eth.chain_id
        tx = {**self._fees(), **tx, "nonce": self._nonce, "chainId": self._chain_id, "from": self.address}
        return self._account.sign_transaction(tx).raw_transaction

    def send(self, tx: dict) -> bytes:
        """Sign and broadcast; returns the transaction hash. The local nonce is first checked
        against the chain's count with pending transactions (one call): past it, a rollback
        dropped a transaction of ours, and one sent with that nonce would wait forever behind
        the gap. Then the chain's count is taken."""
        with self._lock:
            if self._nonce is not None:
                self._nonce = min(self._nonce, self.w3.eth.get_transaction_count(self.address, "pending"))
            raw = self._sign_next(tx)
            try:
                tx_hash = self.w3.eth.send_raw_transaction(raw)
            except Exception:
                self._nonce = None  # resync from the chain next time
                raise
            self.last_nonce = self._nonce
            self._nonce += 1
            return tx_hash

    def resync(self) -> int:
        """Forget the local nonce and take the chain's count of mined transactions: after a
        rollback the local one runs ahead of the chain, and a transaction sent with it would
        wait forever behind the gap. Transactions still pending are to be sent again."""
        with self._lock:
            self._nonce = self.w3.eth.get_transaction_count(self.address, "latest")
            return self._nonce

    def sign_only(self, tx: dict) -> bytes:
        """Sign without broadcasting (used to hold a transaction back). Broadcast it before this
        signer's next send(): send() goes by the chain's count, which a held one is not in."""
        with self._lock:
            raw = self._sign_next(tx)
            self._nonce += 1
            return raw


class BountyToken:
    """BountyToken at one address, with every call signed by a given Signer."""

    def __init__(self, w3: Web3, address: str, artifact: dict | None = None):
        self.w3 = w3
        self.artifact = artifact or load_artifact()
        self.address = Web3.to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=self.artifact["abi"])
        self._reverts = _RevertDecoder(self.artifact["abi"])

    # --- deployment and identity -------------------------------------------------

    @classmethod
    def deploy(cls, signer: Signer, initial_supply: int, artifact: dict | None = None) -> tuple["BountyToken", dict]:
        artifact = artifact or load_artifact()
        factory = signer.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx = factory.constructor(initial_supply).build_transaction({"from": signer.address, "nonce": 0, "gas": 0})
        tx.pop("nonce")
        tx["gas"] = signer.w3.eth.estimate_gas({"from": signer.address, "data": tx["data"]}) + 50_000
        receipt = wait_for(signer.w3, signer.send(tx))
        if receipt["status"] != 1:
            raise ChainError("deploying BountyToken failed")
        return cls(signer.w3, receipt["contractAddress"], artifact), receipt

    def is_genuine(self) -> bool:
        """Whether the code at this address is BountyToken's runtime code."""
        return self.w3.eth.get_code(self.address).hex().removeprefix("0x") == self.artifact[
            "deployedBytecode"
        ].removeprefix("0x")

    # --- reads ---------------------------------------------------------------------

    def balance_of(self, address: str) -> int:
        return self.contract.functions.balanceOf(Web3.to_checksum_address(address)).call()

    def total_supply(self) -> int:
        return self.contract.functions.totalSupply().call()

    # Bounties and books are keyed by (sender, code hash) and (sender, root): every read and
    # redemption names the sender's address first.

    def bounty(self, sender: str, code_hash: bytes) -> BountyInfo:
        sender = Web3.to_checksum_address(sender)
        relayer, expiry, state = self.contract.functions.getBounty(sender, code_hash).call()
        return BountyInfo(sender, relayer, expiry, BOUNTY_STATES[state])

    def book(self, sender: str, root: bytes) -> BookInfo:
        sender = Web3.to_checksum_address(sender)
        return BookInfo(sender, *self.contract.functions.getBook(sender, root).call())

    def is_leaf_spent(self, sender: str, root: bytes, index: int) -> bool:
        return self.contract.functions.isLeafSpent(Web3.to_checksum_address(sender), root, index).call()

    # --- writes --------------------------------------------------------------------

    def transact(self, signer: Signer, call, gas: int | None = None, wait: bool = True):
        """Estimate (which surfaces a revert as ContractRevert), sign, send, and
        by default wait for the receipt and check its status."""
        if gas is None:
            try:
                gas = call.estimate_gas({"from": signer.address})
            except _REVERTS as exc:
                raise self._revert_error(exc) from None
            gas = gas * 5 // 4 + 10_000  # headroom: state may move between estimate and inclusion
        tx = call.build_transaction({"from": signer.address, "gas": gas, "nonce": 0, "chainId": 1,
                                     "maxFeePerGas": 0, "maxPriorityFeePerGas": 0})
        tx_hash = signer.send({"to": tx["to"], "data": tx["data"], "gas": gas, "value": 0})
        if not wait:
            return tx_hash
        receipt = wait_for(self.w3, tx_hash)
        if receipt["status"] != 1:
            raise self.explain_failure(call, signer.address, receipt)
        return receipt

    def explain_failure(self, call, sender: str, receipt) -> ChainError:
        """Replay a failed transaction as a call at its block to recover the custom error."""
        try:
            call.call({"from": sender}, block_identifier=receipt["blockNumber"] - 1)
        except _REVERTS as exc:
            return self._revert_error(exc)
        except Exception:
            pass
        return ChainError(f"transaction {receipt['transactionHash'].hex()} reverted")

    def _revert_error(self, exc: Exception) -> ChainError:
        decoded = self._reverts.decode(_revert_data(exc))
        return decoded or ChainError(f"the contract refused the call: {exc}")

    def register(self, signer: Signer, code_hash: bytes, relayer: str, expiry: int, **kw):
        return self.transact(signer, self.contract.functions.registerBounty(code_hash, relayer, expiry), **kw)

    def redeem(self, signer: Signer, sender: str, code: bytes, **kw):
        return self.transact(signer, self.contract.functions.redeemBounty(Web3.to_checksum_address(sender), code),
                             **kw)

    def redeem_batch(self, signer: Signer, senders: Sequence[str], codes: Sequence[bytes], **kw):
        """Redeem codes[i], registered by senders[i]."""
        call = self.contract.functions.redeemBatch([Web3.to_checksum_address(s) for s in senders], list(codes))
        return self.transact(signer, call, **kw)

    def refund(self, signer: Signer, sender: str, code_hash: bytes, **kw):
        return self.transact(signer, self.contract.functions.refund(Web3.to_checksum_address(sender), code_hash),
                             **kw)

    def open_book(self, signer: Signer, root: bytes, size: int, relayer: str, expiry: int, **kw):
        return self.transact(signer, self.contract.functions.openBook(root, size, relayer, expiry), **kw)

    def redeem_book(self, signer: Signer, sender: str, root: bytes, indices, codes, proof, flags, **kw):
        call = self.contract.functions.redeemBook(Web3.to_checksum_address(sender), root, list(indices), list(codes),
                                                  list(proof), list(flags))
        return self.transact(signer, call, **kw)

    def refund_book(self, signer: Signer, sender: str, root: bytes, **kw):
        return self.transact(signer, self.contract.functions.refundBook(Web3.to_checksum_address(sender), root),
                             **kw)

    def transfer(self, signer: Signer, to: str, amount: int, **kw):
        return self.transact(signer, self.contract.functions.transfer(Web3.to_checksum_address(to), amount), **kw)

    def events(self, receipt, name: str) -> list[dict]:
        """Decoded events of one type from a receipt, as plain dicts of their args."""
        from web3.logs import DISCARD

        return [dict(e["args"]) for e in getattr(self.contract.events, name)().process_receipt(receipt, errors=DISCARD)]


def wait_for(w3: Web3, tx_hash: bytes, timeout: float = 120):
    try:
        return w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout, poll_latency=0.05)
    except Web3Exception as exc:
        raise ChainError(f"no receipt for {tx_hash.hex()} after {timeout:.0f}s: {exc}") from None


def is_dev_chain(w3: Web3) -> bool:
    return w3.eth.chain_id in DEV_CHAIN_IDS


def code_hash(code: bytes) -> bytes:
    """The bounty key: keccak256 of the 32-byte code (dm.chain.books.keccak, the project's one)."""
    return books.keccak(code)

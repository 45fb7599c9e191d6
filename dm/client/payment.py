"""How a sender pays: one bounty per message, or codes from a prepaid book.

A `Payer` hands out one bounty per message: the dict the node sees (a code
hash, or a book root and leaf index) and the secret code that travels inside
the encrypted message. Book secrets are saved under the sender's data folder
before the book is opened, so tokens are never escrowed behind codes we lost.
`payer_for` checks the node's contract before any of that.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dm import datadir
from dm.chain import ethereum
from dm.chain.books import BookSecrets
from dm.client.errors import ClientError

# While the client runs, the book's cursor is saved this far ahead of the next unused leaf, so
# that a crash never reuses a code (without a write per message); close() saves the real one.
CURSOR_STRIDE = 32
GONE_CHECK_SECONDS = 5.0  # after an `unpaid` refusal, the chain is asked about the book at most this often


@dataclass
class Bounty:
    wire: dict  # what the node sees
    code: bytes  # the secret, for the recipient only


def payer_for(welcome: dict, w3, rpc_url: str, eth_key: str, pay: str, expiry_seconds: int, book_size: int,
              books_dir: Path, announce: Callable[[BookSecrets], None]):
    """(token, payer) for the node that sent `welcome`. Pays only into the contract the node
    names, and only if it really is BountyToken on the chain we reach."""
    try:
        chain_id = w3.eth.chain_id
    except Exception as exc:
        raise ClientError(f"cannot reach the chain at {rpc_url}: {exc}") from None
    if chain_id != welcome["chain_id"]:
        raise ClientError(f"the node is paid on chain {welcome['chain_id']} but {rpc_url} is chain {chain_id}")
    token = ethereum.BountyToken(w3, welcome["contract"])
    if not token.is_genuine():
        raise ClientError(f"the code at {token.address} is not BountyToken: refusing to pay into it")
    signer = ethereum.Signer(w3, eth_key)
    relayer = welcome["node_eth_address"]
    if pay == "single":
        return token, SinglePayer(token, signer, relayer, expiry_seconds, books_dir.parent / BOUNTIES_FILE)
    return token, BookPayer(token, signer, relayer, expiry_seconds, book_size, books_dir, announce)


BOUNTIES_FILE = "bounties.jsonl"  # in clients/NAME/: the single bounties registered, for `main.py refund`


class SinglePayer:
    """One registerBounty transaction per message (the original's scheme). Each bounty's hash
    and expiry are appended to `record` (clients/NAME/bounties.jsonl) before it is registered,
    so that `main.py refund` finds the ones no delivery earned.

    Thread-safety: `_lock` guards the record's appends, and the record's flock (datadir.locked)
    keeps them from `main.py refund`'s rewrite in another process; the Signer keeps its nonce
    under its own lock.
    """

    def __init__(self, token: ethereum.BountyToken, signer: ethereum.Signer, relayer: str, expiry_seconds: int,
                 record: Path | None = None):
        self.token, self.signer, self.relayer, self.expiry_seconds = token, signer, relayer, expiry_seconds
        self.record = record
        self._lock = threading.Lock()

    def next_bounty(self) -> Bounty:
        code = secrets.token_bytes(32)
        code_hash = ethereum.code_hash(code)
        expiry = _chain_now(self.token) + self.expiry_seconds
        if self.record is not None:
            with self._lock, datadir.locked(self.record):  # `main.py refund` may be rewriting it
                datadir.append_private_line(self.record, json.dumps({"code_hash": code_hash.hex(), "expiry": expiry}))
        self.token.register(self.signer, code_hash, self.relayer, expiry, gas=150_000)
        return Bounty({"code_hash": code_hash.hex()}, code)

    def next_bounties(self, count: int) -> list[Bounty]:
        return [self.next_bounty() for _ in range(count)]


class BookPayer:
    """Spends one leaf of a prepaid book per message; opens a new book when one runs out.

    Thread-safety: any thread may ask for bounties; `_lock` guards the book, its cursor
    and its file (a new book is opened, and announced, under it).
    """

    def __init__(self, token: ethereum.BountyToken, signer: ethereum.Signer, relayer: str, expiry_seconds: int,
                 size: int, books_dir: Path, announce: Callable[[BookSecrets], None]):
        self.token, self.signer, self.relayer = token, signer, relayer
        self.expiry_seconds, self.size, self.books_dir, self.announce = expiry_seconds, size, books_dir, announce
        self._book: BookSecrets | None = None
        self._cursor = 0
        self._saved_cursor = 0
        self._expiry = 0
        self._lock = threading.Lock()
        self._checked_at = float("-inf")  # when drop_if_gone last asked the chain
        self.books_opened = 0
        self.on_open: Callable[[int, int], None] = lambda size, expiry: None  # (codes, expiry): a user notice
        self._resume()

    def _path(self, root: bytes) -> Path:
        return self.books_dir / f"{root.hex()}.json"

    def _resume(self) -> None:
        """Continue the newest unfinished book for this relayer, if any: only one the chain
        holds as ours (books are keyed by (sender, root)), open, for this relayer. A file whose
        openBook never went through is skipped, whoever else opened a book with that root."""
        now = time.time()
        for path in sorted(self.books_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            record = datadir.read_json(path, None)
            if not record or record.get("relayer") != self.relayer or record["expiry"] < now + 3600:
                continue
            if record["cursor"] >= record["size"]:
                continue
            on_chain = self.token.book(self.signer.address, bytes.fromhex(record["root"].removeprefix("0x")))
            if on_chain.relayer != self.relayer or on_chain.refunded or on_chain.size != record["size"]:
                continue
            self._book = BookSecrets.from_json(record)
            self._cursor = self._saved_cursor = record["cursor"]
            self._expiry = record["expiry"]
            self.announce(self._book)
            return

    def _save(self, book: BookSecrets, cursor: int, expiry: int) -> None:
        record = {**book.to_json(), "relayer": self.relayer, "expiry": expiry, "cursor": cursor}
        path = self._path(book.root)
        if not path.exists():
            datadir.write_secret(path, "{}")  # created 0600: it holds unspent codes
        datadir.write_json(path, record)
        path.chmod(0o600)

    def _open_book(self, at_least: int = 1) -> None:
        balance = self.token.balance_of(self.signer.address) // ethereum.TOKEN
        if balance < at_least:
            raise ethereum.ChainError(f"your account {self.signer.address} has {balance} BTK; {at_least} needed")
        book = BookSecrets.generate(min(max(self.size, at_least), balance))  # a smaller book rather than none
        expiry = _chain_now(self.token) + self.expiry_seconds
        self._save(book, 0, expiry)
        self.token.open_book(self.signer, book.root, book.size, self.relayer, expiry)
        self.announce(book)
        self._book, self._cursor, self._saved_cursor, self._expiry = book, 0, 0, expiry
        self.books_opened += 1
        self.on_open(book.size, expiry)

    def announce_again(self, roots: set[str]) -> None:
        """After a reconnect, or with messages left from an earlier run: announces the current
        book and each unexpired book of ours in `roots` (hex), the books that pay for messages
        about to go again. The node may be another one, or have lost them; and a book opened
        while no node was connected was never announced, so its messages would be refused."""
        with self._lock:
            current = self._book
        books = [current] if current is not None else []
        now = time.time()
        for root in sorted(roots - ({current.root.hex()} if current is not None else set())):
            record = datadir.read_json(self._path(bytes.fromhex(root)), None)
            if record and record.get("relayer") == self.relayer and record.get("expiry", 0) > now:
                books.append(BookSecrets.from_json(record))
        for book in books:
            self.announce(book)

    def drop_if_gone(self) -> bool:
        """The node refused a message `unpaid`: True if the chain no longer holds the current
        book as ours (a rollback dropped its openBook, say). Then the book is forgotten, so that
        the next message opens a new one, and the account's nonce is read from the chain again
        (the rollback left the local one ahead). Asks the chain at most every GONE_CHECK_SECONDS."""
        with self._lock:
            book, now = self._book, time.monotonic()
            if book is None or now - self._checked_at < GONE_CHECK_SECONDS:
                return False
            self._checked_at = now
            try:
                on_chain = self.token.book(self.signer.address, book.root)
                if on_chain.relayer == self.relayer and not on_chain.refunded and on_chain.size == book.size:
                    return False
                self.signer.resync()
            except (ethereum.ChainError, OSError, ValueError):
                return False  # the chain cannot tell now: the next refusal asks again
            self._book = None
            return True

    def next_bounty(self) -> Bounty:
        return self.next_bounties(1)[0]

    def next_bounties(self, count: int) -> list[Bounty]:
        """`count` leaves from one book (a channel message pays every copy from the same
        book, so the node redeems them together); opens a big enough book when needed."""
        with self._lock:
            if self._book is None or self._book.size - self._cursor < count:
                self._open_book(count)
            book, start = self._book, self._cursor
            self._cursor += count
            if self._cursor > self._saved_cursor:
                self._saved_cursor = min(book.size, self._cursor + CURSOR_STRIDE)
                self._save(book, self._saved_cursor, self._expiry)
        root = book.root.hex()
        return [Bounty({"book": root, "index": i}, book.codes[i]) for i in range(start, start + count)]

    def close(self) -> None:
        """A clean exit: saves the real next unused leaf instead of the margin ahead, so the next
        run spends the leaves this one skipped. Every leaf handed out (sent, or only prepared)
        stays below it, so none is ever used twice. Safe to call more than once."""
        with self._lock:
            if self._book is None or self._saved_cursor <= self._cursor:
                return
            try:
                self._save(self._book, self._cursor, self._expiry)
            except OSError:
                return  # the margin ahead stays on disk: a few codes unused, none reused
            self._saved_cursor = self._cursor


def _chain_now(token: ethereum.BountyToken) -> int:
    """Expiry is judged by block time, which may run ahead of ours on a dev chain."""
    return max(int(time.time()), token.w3.eth.get_block("latest")["timestamp"])

"""What the user's money looks like: BTK balance, and what is escrowed in this
client's open books (unspent leaves of books neither refunded nor used up).

Reads the chain, so a read takes a few round trips: callers refresh it off the
input thread and show the last figures.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dm import datadir


@dataclass(frozen=True)
class Funds:
    balance: float  # BTK in the account
    escrowed: int  # BTK in open books, not yet paid to a node
    books: list[tuple[str, int, int]] = field(default_factory=list)  # (root prefix, unspent, expiry) per open book
    read_at: float = 0.0


class Wallet:
    """Balance and escrow of one user.

    Thread-safety: refresh() may run on any thread; `_lock` keeps one refresh at a time and
    guards `_finished` (books seen used up or refunded, never read again). `funds` is
    replaced whole, so readers need no lock.
    """

    def __init__(self, token, address: str, books_dir: Path):
        self.token, self.address, self.books_dir = token, address, books_dir
        self.funds: Funds | None = None
        self._finished: set[str] = set()
        self._lock = threading.Lock()

    def refresh(self) -> Funds:
        from dm.chain import ethereum

        with self._lock:
            balance = self.token.balance_of(self.address) / ethereum.TOKEN
            escrowed, books = 0, []
            for path in self.books_dir.glob("*.json"):
                root = datadir.read_json(path, {}).get("root", "").removeprefix("0x")
                if not root or root in self._finished:
                    continue
                book = self.token.book(self.address, bytes.fromhex(root))
                unspent = book.size - book.spent
                if book.refunded or unspent <= 0:
                    self._finished.add(root)
                    continue
                escrowed += unspent
                books.append((root[:12], unspent, book.expiry))
            self.funds = Funds(balance, escrowed, sorted(books, key=lambda b: b[2]), time.time())
            return self.funds


def btk(amount: float) -> str:
    """12,345 BTK, or 12.5 BTK when there is a fraction."""
    return f"{amount:,.0f} BTK" if amount == int(amount) else f"{amount:,.2f} BTK"


def describe(funds: Funds) -> str:
    """The /balance answer."""
    text = f"balance {btk(funds.balance)}; escrowed {btk(funds.escrowed)}"
    if funds.books:
        parts = [f"{unspent} until {time.strftime('%d %b %H:%M', time.localtime(expiry))}"
                 for _, unspent, expiry in funds.books]
        text += f" in {len(funds.books)} open book(s): {', '.join(parts)} (then `main.py refund NAME`)"
    return text

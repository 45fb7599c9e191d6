"""Users' accounts: key files and Ethereum keys made on request, and what they have escrowed in books."""
from __future__ import annotations

import sys
from pathlib import Path

from dm import crypto, datadir
from dm.chain import ethereum


def create_users(data_dir: Path, names: list[str], bits: int = crypto.DEFAULT_KEY_BITS) -> int:
    """Make RSA keys (`bits`, 3,072 by default) and an Ethereum account for each name."""
    for name in names:
        datadir.check_name(name)
    existing = [n for n in names if datadir.private_key_path(data_dir, n).exists()
                or datadir.eth_key_path(data_dir, n).exists()]
    if existing:
        print(f"error: keys already exist for {', '.join(existing)} in {datadir.keys_dir(data_dir)}; "
              "refusing to overwrite them", file=sys.stderr)
        return 1
    for name in names:
        key = crypto.generate_private_key(bits)
        crypto.save_private_key(datadir.private_key_path(data_dir, name), key)
        crypto.save_public_key(datadir.public_key_path(data_dir, name), key.public_key())
        address, eth_key = ethereum.new_account()
        datadir.write_secret(datadir.eth_key_path(data_dir, name), eth_key)
        print(f"{name}: RSA key {crypto.fingerprint(key.public_key())}")
        print(f"{' ' * len(name)}  Ethereum account {address}")
    print(f"keys are in {datadir.keys_dir(data_dir)}")
    return 0


def unspent_in_books(token: ethereum.BountyToken, data_dir: Path, name: str) -> float:
    """BTK still escrowed in NAME's own books (books are keyed by their sender's account)."""
    total = 0
    sender = ethereum.address_of(datadir.read_eth_key(datadir.eth_key_path(data_dir, name)))
    for path in (data_dir / "clients" / name / "books").glob("*.json"):
        record = datadir.read_json(path, {})
        if "root" in record:
            book = token.book(sender, bytes.fromhex(record["root"].removeprefix("0x")))
            if not book.refunded:
                total += book.size - book.spent
    return float(total)

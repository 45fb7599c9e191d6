"""Users' accounts: key files and Ethereum keys made on request, and what they have escrowed in books."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dm import crypto, datadir

if TYPE_CHECKING:
    from dm.chain import ethereum  # imported where used: `main.py Y` errors answer before web3 loads


def create_users(data_dir: Path, names: list[str], bits: int = crypto.DEFAULT_KEY_BITS) -> int:
    """Make RSA keys (`bits`, 3,072 by default) and an Ethereum account for each name. Nothing is
    made when any name already has key files: those are never overwritten, and the message says
    with which command the other names can be made, and what to do about half-made or broken keys."""
    for name in names:
        datadir.check_name(name)
    states = {name: key_files_problem(data_dir, name) for name in names}
    taken = [name for name, problem in states.items() if problem == ""]
    errors = [f"keys already exist for {', '.join(taken)} in {datadir.keys_dir(data_dir)}; refusing to overwrite "
              "them"] if taken else []
    errors += [f"cannot use {name}'s keys: {problem}" for name, problem in states.items() if problem]
    if errors:
        others = [name for name, problem in states.items() if problem is None]
        if others:
            errors[-1] += f"; create the others with `python3 main.py Y {' '.join(others)}`"
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 1
    for name in names:
        key, address = make_user(data_dir, name, bits)
        print(f"{name}: RSA key {crypto.fingerprint(key.public_key())}")
        print(f"{' ' * len(name)}  Ethereum account {address}")
    print(f"keys are in {datadir.keys_dir(data_dir)}")
    return 0


def key_paths(data_dir: Path, name: str) -> list[Path]:
    return [datadir.private_key_path(data_dir, name), datadir.public_key_path(data_dir, name),
            datadir.eth_key_path(data_dir, name)]


def key_files_problem(data_dir: Path, name: str) -> str | None:
    """None when `name` has no key files, "" when it has all three and they read, else what is
    missing or broken and what to do about it."""
    paths = key_paths(data_dir, name)
    present = [path for path in paths if path.exists()]
    if not present:
        return None
    problems = [f"{path} is missing" for path in paths if not path.exists()]
    readers = (crypto.load_private_key, crypto.load_public_key, datadir.read_eth_key)
    for path, read in zip(paths, readers):
        try:
            if path.exists():
                read(path)
        except (crypto.KeyFileError, datadir.DataError):
            problems.append(f"{path} is not a readable key")
    if not problems:
        return ""
    return (f"{'; '.join(problems)}: restore {'it' if len(problems) == 1 else 'them'} from a backup, or, for a "
            "new key pair, move away "
            f"{' and '.join(', '.join(path.name for path in present).rsplit(', ', 1))} and run "
            f"`python3 main.py Y {name}` again "
            f"(a node that pinned {name}'s old key refuses the new one: pick a new name then)")


def make_user(data_dir: Path, name: str, bits: int):
    """(RSA key, Ethereum address) of a new user; the files written are removed again when this
    fails or is interrupted (Ctrl-C), so a name never stays with half its files."""
    from dm.chain import ethereum

    private, public, eth = key_paths(data_dir, name)
    written: list[Path] = []
    try:
        key = crypto.generate_private_key(bits)
        crypto.save_private_key(private, key)
        written.append(private)
        crypto.save_public_key(public, key.public_key())
        written.append(public)
        address, eth_key = ethereum.new_account()
        datadir.write_secret(eth, eth_key)
        written.append(eth)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return key, address


def unspent_in_books(token: ethereum.BountyToken, data_dir: Path, name: str) -> float:
    """BTK still escrowed in NAME's own books (books are keyed by their sender's account)."""
    from dm.chain import ethereum

    total = 0
    sender = ethereum.address_of(datadir.read_eth_key(datadir.eth_key_path(data_dir, name)))
    for path in (datadir.client_dir(data_dir, name) / "books").glob("*.json"):
        record = datadir.read_json(path, {})
        if "root" in record:
            book = token.book(sender, bytes.fromhex(record["root"].removeprefix("0x")))
            if not book.refunded:
                total += book.size - book.spent
    return float(total)

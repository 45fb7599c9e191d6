"""The user's own key files, read at start: NAME_PRIVATE.pem (RSA: who we are to the node
and to peers) and NAME_ETH.key (the account that pays). A file that is missing, unreadable
or garbled is named, with the two ways out; `main.py Y NAME` alone would refuse, since it
never overwrites keys.
"""
from __future__ import annotations

import os
from pathlib import Path

from dm import crypto, datadir
from dm.chain import ethereum
from dm.client.errors import ClientError


class KeyFileProblem(ClientError):
    """One of the user's key files cannot be used; the message names it and what to do."""


def load_keys(data_dir: Path, me: str):
    """(RSA private key, Ethereum private key hex) of `me`, or KeyFileProblem."""
    pem_path, eth_path = datadir.private_key_path(data_dir, me), datadir.eth_key_path(data_dir, me)
    if not pem_path.exists() and not eth_path.exists():
        raise KeyFileProblem(f"no keys for {me!r} in {datadir.keys_dir(data_dir)}: run `python3 main.py Y {me}` "
                             "first")
    if not pem_path.exists():
        raise _problem(data_dir, me, pem_path, "is missing")
    try:
        rsa_key = crypto.load_private_key(pem_path)
    except crypto.KeyFileError as exc:
        raise _problem(data_dir, me, pem_path, f"cannot be used ({str(exc).replace(f': {pem_path}', '')})") from None
    try:
        eth_key = datadir.read_secret(eth_path)
    except datadir.DataError:
        raise _problem(data_dir, me, eth_path, "is missing") from None
    except OSError as exc:
        raise _problem(data_dir, me, eth_path, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        eth_key = "\0"  # not text: reported below as not a key
    if not eth_key:
        raise _problem(data_dir, me, eth_path, "is empty")
    try:
        ethereum.address_of(eth_key)
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        raise _problem(data_dir, me, eth_path, "does not hold an Ethereum private key (64 hex digits)") from None
    return rsa_key, eth_key


def _problem(data_dir: Path, me: str, path: Path, what: str) -> KeyFileProblem:
    keys = datadir.keys_dir(data_dir)
    files = ", ".join(p.name for p in (datadir.private_key_path(data_dir, me), datadir.public_key_path(data_dir, me),
                                       datadir.eth_key_path(data_dir, me)))
    return KeyFileProblem(
        f"your key file {path} {what}: restore it from a backup; or start over with new keys: move {files} out of "
        f"{keys}{os.sep} and run `python3 main.py Y {me}` (a node that pinned {me} refuses the new key, and the "
        "old account's BTK stay with the old key)")

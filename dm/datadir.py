"""The one data directory every file the project writes lives under.

Chosen by --data-dir, else $DM_DATA_DIR, else ~/.distributed-messaging.

    DATA/keys/NAME_PRIVATE.pem   RSA private key (0600), the original's file name
    DATA/keys/NAME_PUBLIC.pem    RSA public key
    DATA/keys/NAME_ETH.key       the user's Ethereum private key (0600)
    DATA/deployment.json         chain id, RPC URL, contract address, deploy block
    DATA/chain/                  anvil's state file and log, the dev faucet key
    DATA/node/                   the node's pins, journal and account; node.lock, held by the node using them
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from pathlib import Path
from typing import Callable

ENV_VAR = "DM_DATA_DIR"
DEFAULT = Path.home() / ".distributed-messaging"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
ETH_KEY_PATTERN = re.compile(r"(0x)?[0-9a-fA-F]{64}")


class DataError(Exception):
    """A problem with the data directory; the message is for the user."""


class Locked(Exception):
    """Another process holds the lock; `pid` is its process id, or None when it is not known."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is locked by {'process ' + str(pid) if pid else 'another process'}")
        self.path, self.pid = path, pid


def resolve(flag: str | None = None) -> Path:
    """The data directory, created if need be; DataError when it cannot be one."""
    path = Path(flag or os.environ.get(ENV_VAR) or DEFAULT).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        problem = None if os.access(path, os.W_OK | os.X_OK) else "it is not writable"
    except OSError as exc:
        problem = next(("it is a file, not a directory" if p == path else f"{p} is a file, not a directory"
                        for p in (path, *path.parents) if p.is_file()),
                       (exc.strerror or str(exc)).lower())
    if problem:
        origin = "" if flag or not os.environ.get(ENV_VAR) else f" (from ${ENV_VAR})"
        raise DataError(f"cannot use {path}{origin} as the data directory: {problem}; pass --data-dir with a "
                        "writable directory")
    return path


def make_dir(path: Path) -> Path:
    """A folder inside the data directory (0700), made if need be; DataError when it cannot be
    (a file in its place, a read-only or special file system)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if p.is_file()), None)
        problem = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc)).lower()
        raise DataError(f"cannot make the folder {path}: {problem}; move it out of the way, or pass --data-dir "
                        "with a writable directory") from None
    return path


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith("."):
        raise DataError(f"invalid name {name!r}: use 1-32 ASCII letters, digits, '_', '-' or '.', not starting "
                        "with '.'")
    return name


def keys_dir(data_dir: Path) -> Path:
    return make_dir(data_dir / "keys")


def private_key_path(data_dir: Path, name: str) -> Path:
    return keys_dir(data_dir) / f"{check_name(name)}_PRIVATE.pem"


def public_key_path(data_dir: Path, name: str) -> Path:
    return keys_dir(data_dir) / f"{check_name(name)}_PUBLIC.pem"


def eth_key_path(data_dir: Path, name: str) -> Path:
    return keys_dir(data_dir) / f"{check_name(name)}_ETH.key"


def client_dir(data_dir: Path, name: str) -> Path:
    """A user's client files: books, outbox, awaiting claims, bounties, pins of peers."""
    return data_dir / "clients" / check_name(name)


def hold_client_lock(data_dir: Path, name: str):
    """One client.py (or `main.py refund`) per name and data directory: hold_lock on
    DATA/clients/NAME/client.lock. Raises Locked."""
    return hold_lock(client_dir(data_dir, name) / "client.lock")


def known_users(data_dir: Path) -> list[str]:
    return sorted(p.name[: -len("_PRIVATE.pem")] for p in keys_dir(data_dir).glob("*_PRIVATE.pem"))


def read_eth_key(path: Path) -> str:
    """An Ethereum private key file's key (64 hex digits, 0x or not); DataError naming the file when it
    is missing, empty or something else."""
    key = read_secret(path)
    if not ETH_KEY_PATTERN.fullmatch(key):
        raise DataError(f"{path} {'is empty' if not key else 'is not an Ethereum private key'} (it should hold 64 "
                        "hex digits): restore it from a backup (the account's BTK and ETH need this key)")
    return key


def write_secret(path: Path, text: str) -> None:
    """Create a new file readable by its owner only; never overwrite."""
    make_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None


def ensure_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path`, created by `make()` the first time."""
    try:
        write_secret(path, make())
    except FileExistsError:
        pass
    return read_secret(path)


def hold_lock(path: Path):
    """Takes the lock `path` (an flock) for as long as the returned file stays open, and writes
    our pid in it; the OS releases it when this process ends, however it ends (SIGKILL too).
    Raises Locked when another process holds it."""
    make_dir(path.parent)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise Locked(path, int(holder) if holder.isdigit() else None) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive flock on PATH.lock for the block: for a file that one process appends to
    while another rewrites it (an append into the replaced file would be lost)."""
    make_dir(path.parent)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # the lock goes with the file's close


def append_private_line(path: Path, line: str) -> None:
    """Append one line to a file readable by its owner only (made 0600 if new), flushed to disk."""
    make_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def replace_private(path: Path, data: bytes) -> None:
    """Replace a file readable by its owner only (0600) with `data`, atomically and fsynced: a
    crash leaves the old file or the new one, never half of one."""
    make_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_lines(path: Path, lines: list[str]) -> None:
    """Replace a 0600 file with these lines (replace_private)."""
    replace_private(path, "".join(line + "\n" for line in lines).encode())


def write_json(path: Path, value) -> None:
    """Write atomically, so a crash never leaves half a file."""
    make_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); move it away to start afresh") from None

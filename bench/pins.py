"""What one pinned name costs a node: memory, disk, and start-up time (prints; asserts nothing).

    .venv/bin/python bench/pins.py [--pins N]

The figures behind node.py --max-pins. A PinStore (dm.relay.pins) in a temporary directory
takes N new names of 32 characters (the longest allowed), each with its own copy of one public
key in PEM form, as a session pins them (every hello is parsed afresh), for RSA-2048 and
RSA-4096 keys (the largest accepted). Memory is what tracemalloc sees the store keep; disk is
pins.jsonl while the node runs and pins.json once it restarts; start-up is reopening the store
(reading the snapshot and one confusable skeleton per name). fsync is skipped: it costs time,
not bytes.
"""
from __future__ import annotations

import argparse
import secrets
import string
import tempfile
import time
import tracemalloc
from pathlib import Path

import benchlib  # noqa: F401  (puts the project on sys.path)
from dm import crypto
from dm.relay import pins as pins_module
from dm.relay import snapshot_log

ETH_ADDRESS = "0x" + "Ab" * 20  # 42 characters, as every checksummed address


def measure(bits: int, count: int) -> dict:
    pem = crypto.public_key_pem(crypto.generate_private_key(bits))
    alphabet = string.ascii_letters + string.digits
    names = ["".join(secrets.choice(alphabet) for _ in range(32)) for _ in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pins.json"
        store = pins_module.PinStore(path)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        for name in names:
            assert store.pin(name, "".join(pem), ETH_ADDRESS) == "new"  # join: a fresh copy, as parsed from a frame
        pin_seconds = time.perf_counter() - started
        memory = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        log_bytes = store._store.log_path.stat().st_size
        store.close()
        started = time.perf_counter()
        reopened = pins_module.PinStore(path)
        reopen_seconds = time.perf_counter() - started
        snapshot_bytes = path.stat().st_size
        assert len(reopened) == count
        reopened.close()
    return {"bits": bits, "pem": len(pem), "memory": memory / count, "log": log_bytes / count,
            "snapshot": snapshot_bytes / count, "pin_us": pin_seconds / count * 1e6,
            "reopen_us": reopen_seconds / count * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pins", type=int, default=20_000, help="names to pin (default: %(default)d)")
    count = parser.parse_args().pins
    snapshot_log.os.fsync = lambda fd: None  # bytes, not the disk's latency
    print(f"{count:,} new names of 32 characters, each with its own copy of the key's PEM")
    print(f"{'key':>9} {'PEM':>6} {'memory/pin':>11} {'pins.jsonl/pin':>15} {'pins.json/pin':>14} "
          f"{'pin (µs)':>9} {'start-up (µs/pin)':>18}")
    rows = [measure(bits, count) for bits in (2048, 4096)]
    for row in rows:
        print(f"RSA-{row['bits']:<5} {row['pem']:>6} {row['memory']:>9,.0f} B {row['log']:>13,.0f} B "
              f"{row['snapshot']:>12,.0f} B {row['pin_us']:>9.1f} {row['reopen_us']:>18.1f}")
    worst = rows[-1]
    print(f"at --max-pins {pins_module.MAX_PINS:,} (its default), RSA-4096 keys: "
          f"{worst['memory'] * pins_module.MAX_PINS / 1e6:,.0f} MB of memory, "
          f"{max(worst['log'], worst['snapshot']) * pins_module.MAX_PINS / 1e6:,.0f} MB of disk, "
          f"{worst['reopen_us'] * pins_module.MAX_PINS / 1e6:.1f} s more to start")


if __name__ == "__main__":
    main()

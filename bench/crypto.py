"""Micro-benchmark of envelope sealing/opening (prints rates; asserts nothing about speed).

    .venv/bin/python bench/crypto.py [--quick]

Modes: per-message seal/open (one RSA-PSS sign + one RSA-OAEP unwrap per message);
seal_many in batches of 100 with SessionKeys + open with UnwrapCache; one channel message
to 1,000 distinct recipients with seal_many (fresh AES key each) versus 1,000 seal calls.
"""

import json
import os
import statistics
import sys
import time

import benchlib  # noqa: F401  (puts the project on sys.path)
from dm import crypto as ku

PAYLOAD = {"text": "hello, this is a fairly ordinary chat message", "code": "ab" * 32}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def report(label, n, seconds):
    print(f"  {label:<58} {n:>6} msgs {seconds * 1e3:9.1f} ms {n / seconds:10.0f} msg/s")


def main(quick: bool = False):
    n_single, n_batched, channel = (200, 1000, 1000) if quick else (1000, 10_000, 1000)
    alice, bob = ku.generate_private_key(), ku.generate_private_key()
    pool = [ku.generate_private_key() for _ in range(8)]  # cost per recipient is key-independent
    members = [(f"member-{i:04d}", pool[i % len(pool)]) for i in range(channel)]
    print(f"envelope crypto, RSA-2048, {os.cpu_count()} CPUs, one thread")

    print("per-message seal/open (today):")
    envs, s = timed(lambda: [ku.seal(PAYLOAD, sender="alice", recipient="bob", sender_key=alice,
                                     recipient_public_key=bob.public_key())
                             for _ in range(n_single)])
    report("seal", n_single, s)
    guard = ku.ReplayGuard()
    _, s = timed(lambda: [ku.open_envelope(e, recipient="bob", recipient_key=bob,
                                           sender_public_key=alice.public_key(), replay_guard=guard)
                          for e in envs])
    report("open (+ReplayGuard)", n_single, s)

    print("seal_many, batches of 100, SessionKeys; open with UnwrapCache:")
    sk, pub = ku.SessionKeys(), bob.public_key()
    envs, s = timed(lambda: [e for _ in range(n_batched // 100) for e in ku.seal_many(
        [(PAYLOAD, "bob", pub)] * 100, sender="alice", sender_key=alice, session_keys=sk)])
    report("seal_many x100 + SessionKeys", n_batched, s)
    guard, cache = ku.ReplayGuard(), ku.UnwrapCache()
    _, s = timed(lambda: [ku.open_envelope(e, recipient="bob", recipient_key=bob,
                                           sender_public_key=alice.public_key(),
                                           replay_guard=guard, unwrap_cache=cache)
                          for e in envs])
    report("open (+ReplayGuard, UnwrapCache)", n_batched, s)

    print(f"one channel message to {channel} distinct recipients:")
    items = [(PAYLOAD, name, key.public_key()) for name, key in members]
    runs = []
    for _ in range(3 if quick else 5):
        envs, s = timed(lambda: ku.seal_many(items, sender="alice", sender_key=alice))
        runs.append(s)
    report("seal_many, fresh AES key per member (median run)", channel, statistics.median(runs))
    sk = ku.SessionKeys()
    ku.seal_many(items, sender="alice", sender_key=alice, session_keys=sk)
    _, s = timed(lambda: ku.seal_many(items, sender="alice", sender_key=alice, session_keys=sk))
    report("seal_many, next message with SessionKeys warm", channel, s)
    _, s = timed(lambda: [ku.seal(PAYLOAD, sender="alice", recipient=name, sender_key=alice,
                                  recipient_public_key=key.public_key()) for name, key in members])
    report("1,000 x seal (today)", channel, s)
    sample = envs[:200]
    keys = dict(members)
    _, s = timed(lambda: [ku.open_envelope(e, recipient=e["to"], recipient_key=keys[e["to"]],
                                           sender_public_key=alice.public_key()) for e in sample])
    print(f"  each member opens its envelope (cold, RSA unwrap): {s / len(sample) * 1e3:.2f} ms "
          f"(proof of {len(envs[0]['proof'])} hashes, "
          f"{len(json.dumps(envs[0]))} bytes of JSON)")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)

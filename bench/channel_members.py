"""bench/channel.py's worker processes: each holds a few hundred member ChatClients in one
channel and reports when, and how, each copy of a message arrived."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import HOST, own_cpu, raise_nofile

CONNECT_THREADS = 6  # concurrent handshakes per worker

raise_nofile()  # at import: in every spawned worker


def member_worker(cfg: dict, commands, results) -> None:
    """Connect and join every name in cfg["names"], report ("ready", ...), then answer commands:
    ("collect", text, timeout) -> ("arrivals", ...) once every member has `text` or at the
    timeout; ("stop",) -> close every client, ("stopped", ...)."""
    from dm.chain import ethereum
    from dm.client.core import ChatClient, Events

    data_dir, channel = Path(cfg["data_dir"]), cfg["channel"]
    if cfg.get("switch_interval"):
        sys.setswitchinterval(cfg["switch_interval"])
    w3 = ethereum.connect(cfg["rpc_url"])  # one per process, shared by its clients
    arrivals: dict[str, dict[str, tuple]] = {}  # text -> member -> (time, genuine, problem, channel, sender)
    notices: list[str] = []
    cond = threading.Condition()

    def on_message_for(name: str):
        def on_message(incoming) -> None:
            now = time.time()
            with cond:
                per_text = arrivals.setdefault(incoming.text if incoming.genuine else "<not genuine>", {})
                per_text.setdefault(name, (now, incoming.genuine, incoming.problem, incoming.channel,
                                           incoming.sender))
                cond.notify_all()
        return on_message

    handling = {"cpu": 0.0, "calls": 0}  # thread CPU inside ChatClient._on_deliver (verify, decrypt, claim)

    def timed(on_deliver):
        def wrapper(message):
            started = time.thread_time()
            try:
                return on_deliver(message)
            finally:
                handling["cpu"] += time.thread_time() - started  # under the GIL: no lost updates that matter
                handling["calls"] += 1
        return wrapper

    def connect(name: str):
        try:
            client = ChatClient(HOST, cfg["port"], name, data_dir, rpc_url=cfg["rpc_url"], w3=w3,
                                events=Events(message=on_message_for(name),
                                              notice=lambda text: notices.append(f"{name}: {text}")))
            client._on_deliver = timed(client._on_deliver)
            client.connect()
            client.join(channel)
            return client
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return f"{name}: {type(exc).__name__}: {exc}"

    started = time.time()
    with ThreadPoolExecutor(CONNECT_THREADS) as pool:
        outcomes = list(pool.map(connect, cfg["names"]))
    clients = [o for o in outcomes if not isinstance(o, str)]
    failures = [o for o in outcomes if isinstance(o, str)]
    results.put(("ready", cfg["index"], {"connected": len(clients), "failed": len(failures),
                                         "failure_samples": failures[:5], "seconds": time.time() - started,
                                         "pid": os.getpid()}))
    try:
        while True:
            command = commands.get()
            if command[0] == "stop":
                break
            _, text, timeout = command
            deadline = time.monotonic() + timeout
            with cond:
                while len(arrivals.get(text, {})) < len(clients) and time.monotonic() < deadline:
                    cond.wait(max(0.0, min(0.5, deadline - time.monotonic())))
                got = dict(arrivals.get(text, {}))
                bad = dict(arrivals.get("<not genuine>", {}))
            results.put(("arrivals", cfg["index"], {"text": text, "arrivals": got, "not_genuine": bad,
                                                    "notices": notices[:10], "cpu": own_cpu(),
                                                    "on_deliver_cpu": handling["cpu"],
                                                    "on_deliver_calls": handling["calls"]}))
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
    results.put(("stopped", cfg["index"], {}))

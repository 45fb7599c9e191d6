"""node.py as a subprocess, the one way every benchmark runs it.

Its own process group (a Ctrl-C at the terminal reaches us, and we stop it), optionally
pinned to CPUs and optionally under cProfile (every thread). Its stdout and stderr lines
are kept with their arrival time, and written to a log file as they come.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchlib import HOST, ROOT
from dm.net import free_port

# The node's log line for each redemption transaction (dm/relay/node.py, Node._on_redeemed).
REDEEMED = re.compile(r"redeemed (\d+) code\(s\) in tx (0x[0-9a-fA-F]+) \(gas (\d+)\)")

PROFILE_WRAPPER = r"""
import cProfile, pstats, sys, threading, time
root, out, clock = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [root + "/node.py", *sys.argv[4:]]
timer = time.thread_time if clock == "cpu" else time.perf_counter
sys.path.insert(0, root)
finished, lock = [], threading.Lock()
_run = threading.Thread.run

def run(self):  # one profiler per thread; kept when the thread ends (connection threads end on close)
    profiler = cProfile.Profile(timer)
    profiler.enable()
    try:
        _run(self)
    finally:
        profiler.disable()
        with lock:
            finished.append(profiler)

threading.Thread.run = run
from dm.cli import node
try:
    code = node.main()
finally:
    deadline = time.monotonic() + 10  # connection threads finish once their sockets are closed
    for thread in threading.enumerate():
        if thread.name == "conn":
            thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        done = list(finished)
    if done:
        stats = pstats.Stats(done[0])
        for profiler in done[1:]:
            stats.add(profiler)
        stats.dump_stats(out)
sys.exit(code)
"""


class NodeProcess:
    """node.py on `data` (its data directory: deployment.json must be there), on a free port."""

    def __init__(self, data: Path, rpc_url: str, *, label: str = "node", log_level: str = "warning",
                 batch_size: int | None = None, batch_wait: float | None = None,
                 max_connections: int | None = None, new_names_per_hour: int | None = None,
                 extra_args: list[str] | None = None,
                 cpus: set[int] | None = None,
                 profile: Path | None = None, profile_clock: str = "cpu"):
        self.label, self.data, self.profile = label, data, profile
        self.port = free_port(HOST)
        args = ["--host", HOST, "--port", str(self.port), "--rpc-url", rpc_url, "--data-dir", str(data),
                "--log-level", log_level]
        for flag, value in (("--batch-size", batch_size), ("--batch-wait", batch_wait),
                            ("--max-connections", max_connections), ("--new-names-per-hour", new_names_per_hour)):
            if value is not None:
                args += [flag, str(value)]
        args += list(extra_args or [])  # e.g. --cluster nats://... (bench/cluster.py)
        if profile is not None:
            profile.parent.mkdir(parents=True, exist_ok=True)
            profile.unlink(missing_ok=True)
            cmd = [sys.executable, "-c", PROFILE_WRAPPER, str(ROOT), str(profile), profile_clock, *args]
        else:
            cmd = [sys.executable, str(ROOT / "node.py"), *args]
        self.log_path = data / "node.log"
        self._log = open(self.log_path, "w")
        self.lines: list[tuple[float, str]] = []  # (time.time() of arrival, line)
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self._stopped = False
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid
        if cpus:  # before the interpreter starts its threads: they inherit it
            os.sched_setaffinity(self.pid, cpus)
        self._pumps = [threading.Thread(target=self._pump, args=(stream,), daemon=True)
                       for stream in (self.proc.stdout, self.proc.stderr)]
        for pump in self._pumps:
            pump.start()

    def _pump(self, stream) -> None:
        for line in stream:
            now = time.time()
            if line.startswith("node ready"):
                self.ready.set()
            with self.lock:
                self.lines.append((now, line.rstrip("\n")))
                with contextlib.suppress(ValueError):  # the log is closed once the node is gone
                    self._log.write(line)

    def wait_ready(self, timeout: float = 60) -> "NodeProcess":
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.label} did not start:\n{self.tail()}")
        return self

    @property
    def eth_address(self) -> str:
        """The account the node is paid to (node.py makes its key on the first start)."""
        from dm.chain import ethereum

        return ethereum.address_of((self.data / "node" / "node_ETH.key").read_text().strip())

    def mark(self) -> int:
        """A place in the log, for redemptions(since=...)."""
        with self.lock:
            return len(self.lines)

    def redemptions(self, since: int = 0) -> list[dict]:
        """The node's "redeemed N code(s) in tx ... (gas G)" lines since `since`."""
        with self.lock:
            lines = self.lines[since:]
        out = []
        for at, line in lines:
            match = REDEEMED.search(line)
            if match:
                out.append({"codes": int(match[1]), "tx": match[2], "gas": int(match[3]), "logged_at": at})
        return out

    def tail(self, count: int = 30) -> str:
        with self.lock:
            return "\n".join(line for _, line in self.lines[-count:])

    def print_tail(self, count: int = 30) -> None:
        """The last lines of the log on stderr (after a failure)."""
        print(f"--- {self.label} log (tail) ---\n{self.tail(count)}", file=sys.stderr)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the group (the node redeems what is queued and exits), then SIGKILL. Safe to repeat."""
        if self._stopped:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for pump in self._pumps:
            pump.join(5)
        with self.lock:
            self._log.close()
        self._stopped = True


def profile_summary(path: Path, limit: int = 25) -> tuple[str, list]:
    """The top functions of a profile written under PROFILE_WRAPPER, by own time: (text, rows)."""
    import pstats

    buffer = io.StringIO()
    stats = pstats.Stats(str(path), stream=buffer)
    stats.sort_stats("tottime").print_stats(limit)
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:limit]:
        rows.append({"function": f"{Path(filename).name}:{line}({func})", "calls": nc,
                     "tottime": round(tt, 3), "cumtime": round(ct, 3)})
    return buffer.getvalue(), rows

"""Helpers the benchmarks share: ports, file limits, CPU time, the machine, results."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import socket
import time
from pathlib import Path

HOST = "127.0.0.1"


def raise_nofile() -> int:
    """Lift the open-file limit to its hard cap (thousands of sockets); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values) - idle) / tick, sum(values) / tick


def background_load(seconds: float = 1.0) -> float:
    """CPU busy on the whole machine while we do nothing (other work skews every number here)."""
    busy0, total0 = machine_busy()
    time.sleep(seconds)
    busy1, total1 = machine_busy()
    return round((busy1 - busy0) / max(1e-9, total1 - total0), 2)


def environment() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), "")
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": model,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": platform.platform(), "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "loadavg_at_start": os.getloadavg()[0], "background_cpu_busy_at_start": background_load()}


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, interpolated (nan for no values)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def finish(out: dict, started: float, failed: BaseException | None, results: Path, root: Path,
           report: str) -> int:
    """Record the run's time and end load, write the results file, print the report."""
    out["run_seconds"] = round(time.perf_counter() - started, 1)
    out["environment"]["loadavg_at_end"] = os.getloadavg()[0]
    if failed is not None:
        out["failed"] = repr(failed)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(out, indent=1) + "\n")
    print()
    print(report)
    print()
    print(f"run time {out['run_seconds']} s; raw numbers in {results.relative_to(root)}")
    return 1 if failed is not None else 0

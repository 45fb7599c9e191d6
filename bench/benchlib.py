"""Helpers the benchmarks share: the project on sys.path, file limits, CPU time, the machine, results.

Importing this module puts the project root on sys.path, so `dm` imports work in every
bench script and in the worker processes they spawn (spawn passes sys.path on).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS_DIR = ROOT / "bench" / "results"
HOST = "127.0.0.1"


def raise_nofile() -> int:
    """Lift the open-file limit to its hard cap (thousands of sockets); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def interrupt_on_sigterm() -> None:
    """A SIGTERM ends the run like Ctrl-C does: through every `finally` that stops our processes."""
    def interrupt(*_):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, interrupt)


# --- one process, from /proc ---------------------------------------------------------------

def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    return sum(cpu_split(pid))


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches over every thread of a process."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/status") as handle:
            for line in handle:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[-1])
    return total


def proc_status(pid: int) -> dict:
    """Threads and VmRSS of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS"):
                out[key] = value.strip()
    return out


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the machine ---------------------------------------------------------------------------

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
    """The machine, measured now, and printed with a warning when something else keeps it busy."""
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), "")
    env = {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": model,
           "python": platform.python_version(), "implementation": platform.python_implementation(),
           "platform": platform.platform(), "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
           "loadavg_at_start": os.getloadavg()[0], "background_cpu_busy_at_start": background_load()}
    print(f"environment: {env['cpu_count']} CPUs ({env['cpus_usable']} usable) {env['cpu_model']}; "
          f"Python {env['python']} ({env['implementation']}); RLIMIT_NOFILE {env['nofile_limit']}; "
          f"load average {env['loadavg_at_start']:.2f}, machine {env['background_cpu_busy_at_start']:.0%} busy "
          "before we start", flush=True)
    if env["background_cpu_busy_at_start"] > 0.1:
        print("WARNING: something else is using the CPU; every number below is skewed by it", flush=True)
    return env


# --- figures and results -------------------------------------------------------------------

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


def finish(out: dict, started: float, failed: BaseException | None, results: Path, report: str) -> int:
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
    print(f"run time {out['run_seconds']} s; raw numbers in {results.relative_to(ROOT)}")
    return 1 if failed is not None else 0

"""How fast the commands start: `--help` of node.py, client.py and main.py, and the time
until client.py shows its prompt (and accepts typing) in a pseudo-terminal.

    .venv/bin/python bench/startup.py [--runs 7]

Targets (issue 11): every --help under 0.5 s; the client ready under 1.5 s. The client's
prompt comes before web3 is imported (that happens behind the prompt, with the connection),
so "ready" here is the prompt; "connected" needs a node and is not measured here.
A busy machine skews every figure: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import ROOT

PYTHON = sys.executable
HELP_TARGET, READY_TARGET = 0.5, 1.5


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_help(script: str, runs: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) per run; the CPU figure is what a busy machine does not inflate."""
    times, cpu = [], []
    for _ in range(runs):
        started, cpu_before = time.perf_counter(), children_cpu()
        subprocess.run([PYTHON, script, "--help"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
        cpu.append(children_cpu() - cpu_before)
    return times, cpu


def time_prompt(runs: int) -> list[float]:
    """client.py in a pty against a listener that accepts and stays silent: the prompt is the
    client's part of being ready (the node's answer is the node's)."""
    import pexpect

    from dm.cli import accounts

    times = []
    with tempfile.TemporaryDirectory() as data, socket.create_server(("127.0.0.1", 0)) as listener:
        with contextlib.redirect_stdout(io.StringIO()):
            accounts.create_users(Path(data), ["bench_me"], bits=2048)
        port = listener.getsockname()[1]
        for _ in range(runs):
            started = time.perf_counter()
            child = pexpect.spawn(PYTHON, ["client.py", "127.0.0.1", str(port), "bench_me", "bench_peer",
                                           "--data-dir", data], cwd=str(ROOT), dimensions=(24, 100),
                                  env={"PATH": "/usr/bin:/bin", "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"})
            child.expect("bench_me -> bench_peer>", timeout=30)
            times.append(time.perf_counter() - started)
            child.sendeof()
            child.expect(pexpect.EOF, timeout=30)
            child.close()
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out: dict = {"environment": benchlib.environment(), "runs": args.runs, "help": {}, "targets": {
        "help_seconds": HELP_TARGET, "ready_seconds": READY_TARGET}}
    failed = None
    rows = []
    try:
        for script in ("node.py", "client.py", "main.py"):
            times, cpu = time_help(script, args.runs)
            out["help"][script] = {"wall": times, "cpu": cpu}
            rows.append((f"{script} --help", times, HELP_TARGET, cpu))
        times = time_prompt(args.runs)
        out["client_prompt"] = times
        rows.append(("client.py: prompt shown", times, READY_TARGET, None))
    except BaseException as exc:  # noqa: BLE001  recorded in the results file
        failed = exc
    lines = ["| what | median s | max s | median CPU s | target s | |", "|---|---:|---:|---:|---:|---|"]
    for label, times, target, cpu in rows:
        median = statistics.median(times)
        cpu_text = f"{statistics.median(cpu):.2f}" if cpu else "-"
        lines.append(f"| {label} | {median:.2f} | {max(times):.2f} | {cpu_text} | {target} | "
                     f"{benchlib.verdict(median <= target)} |")
    return benchlib.finish(out, started, failed, benchlib.RESULTS_DIR / "startup.json", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

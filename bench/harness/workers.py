"""Worker processes (multiprocessing, spawn) for the load generators: started, watched for
errors, and always reaped. A worker reports a failure as ("error", role, traceback) on its
results queue, and aborts the barrier it was given so that nobody waits for it."""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import time
import traceback


def _run(target, role: str, cpus, barrier, results, args) -> None:
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        target(*args)
    except BaseException:
        if barrier is not None:
            with contextlib.suppress(Exception):
                barrier.abort()
        results.put(("error", role, traceback.format_exc()))


class Workers:
    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.procs: list = []

    def spawn(self, target, role: str, *args, results, barrier=None, cpus=None):
        """Run target(*args) in a new process (pinned to `cpus` if given)."""
        proc = self.ctx.Process(target=_run, args=(target, role, cpus, barrier, results, args), daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def next_result(self, results, timeout: float):
        """The next item on `results`, or None after `timeout` s. A worker's error, or a worker
        that died without one, raises RuntimeError."""
        try:
            item = results.get(timeout=timeout)
        except queue.Empty:
            dead = [p for p in self.procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"a worker died (exit code {dead[0].exitcode})") from None
            return None
        if item[0] == "error":
            raise RuntimeError(f"{item[1]} failed:\n{item[2]}")
        return item

    @staticmethod
    def errors(results, wait: float = 2) -> str:
        """The errors the workers reported (after a broken barrier: who broke it, and why)."""
        errors = []
        with contextlib.suppress(Exception):
            while True:
                item = results.get(timeout=wait)
                if item[0] == "error":
                    errors.append(f"{item[1]}:\n{item[2]}")
        return "\n".join(errors) or "(no error reported)"

    def reap(self, procs=None, timeout: float = 15) -> None:
        """Join `procs` (default: all) within `timeout` s together; terminate, then kill, the rest."""
        deadline = time.monotonic() + timeout
        for proc in list(self.procs if procs is None else procs):
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            if proc in self.procs:
                self.procs.remove(proc)  # reaped: its exit code no longer means a failure

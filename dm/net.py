"""Two socket idioms used everywhere: a free loopback port, and hanging up without caring whether the peer already did."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests, benchmarks and the demo)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def hang_up(sock: socket.socket | None) -> None:
    """Shut both directions down, so a thread blocked in recv() wakes up; a socket already closed is fine."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

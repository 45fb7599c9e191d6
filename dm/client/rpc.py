"""The client's own connection to the chain, and chain failures in a user's words.

A chain that stops answering must cost the user one error line, not minutes. web3's
HTTP provider waits 30 s per request (dm.chain.ethereum.connect's default) and tries
a timed-out read five more times: three minutes for one `/balance`. The client's
connection waits at most CHAIN_TIMEOUT seconds per request ($DM_CHAIN_TIMEOUT) and
never retries: a failed action is reported, and the user tries it again.

ChainWatch counts the requests in flight, so that the terminal can say that it is
waiting for the chain (and not for the node) while a line is being handled.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Mapping

from dm.client.errors import ClientError

# Seconds one JSON-RPC request may take. anvil answers in milliseconds and a public endpoint
# in one or two seconds; a request still unanswered after 10 s is a chain that is stuck or
# gone. Also the node's own wait for a reply (connection.REPLY_TIMEOUT).
CHAIN_TIMEOUT = 10.0
TIMEOUT_ENV_VAR = "DM_CHAIN_TIMEOUT"


def chain_timeout(environ: Mapping[str, str] = os.environ) -> float:
    """CHAIN_TIMEOUT, or $DM_CHAIN_TIMEOUT when set."""
    text = environ.get(TIMEOUT_ENV_VAR, "").strip()
    if not text:
        return CHAIN_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 600:
        raise ClientError(f"${TIMEOUT_ENV_VAR}={text!r}: give the seconds one chain request may take "
                          f"(more than 0, at most 600; default {CHAIN_TIMEOUT:g})")
    return value


class ChainWatch:
    """The chain requests in flight, by when each started.

    Thread-safety: any thread may make requests and ask; `_lock` guards the table.
    Given to web3 as a middleware factory (web3 calls it with the Web3).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        self._next = 0

    @contextmanager
    def request(self):
        with self._lock:
            self._next += 1
            ticket = self._next
            self._started[ticket] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                del self._started[ticket]

    def waiting(self) -> float:
        """Seconds the oldest request in flight has waited so far; 0 when none is."""
        with self._lock:
            oldest = min(self._started.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def __call__(self, w3):
        from web3.middleware.base import Web3Middleware

        watch = self

        class Watching(Web3Middleware):
            def wrap_make_request(self, make_request):
                def middleware(method, params):
                    with watch.request():
                        return make_request(method, params)
                return middleware

        return Watching(w3)


def connect(url: str, timeout: float, watch: ChainWatch):
    """A Web3 for `url` whose requests wait at most `timeout` seconds each, are not retried,
    and are counted by `watch`."""
    from dm.chain import ethereum

    w3 = ethereum.connect(url, timeout=timeout)
    if hasattr(w3.provider, "exception_retry_configuration"):
        w3.provider.exception_retry_configuration = None
    w3.middleware_onion.add(watch, name="chain_watch")
    return w3


def describe(exc: BaseException, url: str, timeout: float) -> str:
    """What went wrong with the chain, without urllib3's pool details."""
    import requests

    if isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectionError):
        return f"the chain at {url} did not answer within {timeout:g}s"
    if isinstance(exc, (requests.ConnectionError, ConnectionError)):
        return f"cannot reach the chain at {url} (nothing answers there)"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "…"

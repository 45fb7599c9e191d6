"""One log line when the chain stops answering, and one when it answers again,
instead of an error per attempt (the redeemer and the bounty index retry every second).
"""
from __future__ import annotations

import logging
import re
import threading
import time

log = logging.getLogger("node")

_HOST_PORT = re.compile(r"host='([^']+)', port=(\d+)")


def is_outage(exc: BaseException) -> bool:
    """A failure to reach the chain at all (requests' ConnectionError and timeouts are OSErrors)."""
    return isinstance(exc, (OSError, TimeoutError)) or "HTTPConnectionPool" in str(exc)


def where(exc: BaseException) -> str:
    found = _HOST_PORT.search(str(exc))
    return f"{found.group(1)}:{found.group(2)}" if found else "its RPC URL"


class ChainOutage:
    """Whether the chain is down, as the node's chain users last saw it.

    Thread-safety: any thread may call failed() and answered(); `_lock` guards `down_since`.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.down_since: float | None = None
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, what: str) -> bool:
        """Notes a failed chain call; True when it was an outage (logged once, when it starts)."""
        if not is_outage(exc):
            return False
        with self._lock:
            if self.down_since is not None:
                return True
            self.down_since = self.clock()
        log.error("the chain at %s does not answer (%s): %s wait until it is back; start it again "
                  "(`python3 main.py chain`) or check --rpc-url", where(exc), type(exc).__name__, what)
        return True

    def answered(self) -> None:
        if self.down_since is None:  # the usual case: no lock on every successful call
            return
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            log.info("the chain answers again after %.0f s", self.clock() - since)


CHAIN = ChainOutage()  # shared by the redeemer and the bounty index of this process

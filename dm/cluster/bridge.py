"""The one event-loop thread between the threaded node and nats-py (which is asyncio-only)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Awaitable, Callable

import nats

log = logging.getLogger("node")


class ClusterUnavailable(Exception):
    """NATS did not answer in time; the message is for the user."""


class Bridge:
    """Owns one asyncio loop in a thread of its own and the NATS connection on it.

    Thread-safety: the NATS client (`nc`, `js`) is touched only by coroutines on the loop
    thread. Other threads hand work over with call() (wait for the result) or submit() (don't).
    Blocking work the loop must not do (a socket write to a slow client, an fsync) goes to
    `pool`, a small thread pool, through offload()."""

    def __init__(self, servers: list[str], name: str, connect_timeout: float = 10, request_timeout: float = 2):
        self.servers, self.name, self.connect_timeout = servers, name, connect_timeout
        self.request_timeout = request_timeout  # JetStream API calls (KV reads and writes, publishes)
        self.loop = asyncio.new_event_loop()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cluster-io")
        self.nc = None
        self.js = None
        self.on_reconnect: list[Callable[[], Awaitable]] = []  # coroutines to run after a reconnect (loop only)
        self._closing = False  # stop() has begun: losing the server is expected
        self._thread = threading.Thread(target=self._run, name="cluster-loop", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self._thread.start()
        self.call(self._connect(), timeout=self.connect_timeout + 5)

    async def _connect(self) -> None:
        async def on_error(exc):
            # while reconnecting, every failed try (five a second) is reported: the first line said it
            (log.debug if self.nc is not None and self.nc.is_reconnecting else log.warning)("cluster: %s", exc)

        async def on_disconnected():
            if not self._closing:
                log.warning("cluster: lost the NATS server; reconnecting to another one")

        async def on_reconnected():
            log.info("cluster: reconnected to %s", self.nc.connected_url.netloc)
            for restart in list(self.on_reconnect):
                self.loop.create_task(restart())

        try:
            self.nc = await nats.connect(self.servers, name=self.name, connect_timeout=2,
                                         max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                         allow_reconnect=True, error_cb=on_error,
                                         disconnected_cb=on_disconnected, reconnected_cb=on_reconnected)
        except Exception as exc:
            raise ClusterUnavailable(f"cannot reach NATS at {','.join(self.servers)} ({exc}): start "
                                     "nats-server, or check the --cluster addresses") from None
        self.js = self.nc.jetstream(timeout=self.request_timeout)

    def call(self, coroutine: Awaitable, timeout: float = 5):
        """Run a coroutine on the loop and wait for its result (from any thread but the loop's)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ClusterUnavailable(f"the network of nodes did not answer within {timeout:g}s") from None
        except nats.errors.Error as exc:  # e.g. JetStream electing its leaders after a restart
            raise ClusterUnavailable(f"the network of nodes is not ready ({exc})") from None

    async def _close(self) -> None:
        """Close, not drain: the parts stopped first (claims unacknowledged are delivered again),
        and a drain waited its full timeout for the pull consumer. Then end what is left on the
        loop, so that no task is destroyed pending (a warning with a traceback at every stop)."""
        self._closing = True
        try:
            await self.nc.close()
        finally:
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def submit(self, coroutine: Awaitable) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def offload(self, function: Callable, *args):
        """Run blocking work off the loop (on the pool) and await it."""
        return await self.loop.run_in_executor(self.pool, function, *args)

    def stop(self) -> None:
        if self.nc is not None and self._thread.is_alive():
            try:
                self.call(self._close(), timeout=5)
            except Exception:  # a NATS that is gone cannot be closed cleanly; we stop anyway
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.pool.shutdown(wait=True)

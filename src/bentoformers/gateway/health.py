"""Whether each model service answers, as the gateway sees it: the truth behind /readyz, and fast 503s.

A watcher per model service and gateway worker makes a real call (`describe`, answered by the model
service's own process once its start-up check has passed) every `interval` seconds, bounded by `timeout`.
The gateway is ready only when every model service answered its last call. One that has never answered is
starting: not ready, and its requests wait for it (another gateway worker may have seen it answer and made
the server ready). A model service that is down
(killed: BentoML's supervisor holds its socket, so calls wait instead of failing, for the whole restart;
stopped; hung) is known within `timeout`, or as soon as a check made at once confirms a failed call; while
it is down its requests get 503 + Retry-After at once instead of waiting, and the watcher notices when
BentoML has restarted it. /readyz only reads the state: it never waits on a model service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import aiohttp

logger = logging.getLogger("bentoformers.health")
State = Literal["unknown", "up", "down"]
T = TypeVar("T")


class ModelDown(Exception):
    """The model service went down while a call to it waited."""


class ModelHealth:
    def __init__(
        self, name: str, ping: Callable[[], Awaitable[object]], interval: float = 1.0, timeout: float = 2.0
    ) -> None:
        self.name, self.ping, self.interval, self.timeout = name, ping, interval, timeout
        self.state: State = "unknown"
        self._since = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._confirming: asyncio.Task[None] | None = None
        self._went_down = asyncio.Event()  # set while down; a new one each time it is back
        self._decided = asyncio.Event()  # set at the first answer or failure
        self._said_starting = False

    def watch(self) -> None:
        """Starts the watcher on the running loop (once; the first probe or request calls it)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:  # (a test's new loop)
            self._went_down, self._decided = asyncio.Event(), asyncio.Event()
            if self.down:
                self._went_down.set()
            self._task = loop.create_task(self._watch(), name=f"health {self.name}")

    async def first_decided(self) -> None:
        """Waits (at most one call's timeout) for the first answer or failure, so the first probe can be true."""
        try:
            async with asyncio.timeout(self.timeout + 0.5):
                await self._decided.wait()
        except TimeoutError:
            pass

    @property
    def down(self) -> bool:
        return self.state == "down"

    def failed(self, exc: BaseException) -> None:
        """A call failed as a dead service fails (no connection): check the service now, and mark it down only
        if that check fails too. A keep-alive connection that the service had just closed fails a call the same
        way while the service answers: marking it down then refused every call waiting on it."""
        if is_connection_failure(exc) and (self._confirming is None or self._confirming.done()):
            self._confirming = asyncio.get_running_loop().create_task(self._check(), name=f"health check {self.name}")

    async def unless_down(self, awaitable: Awaitable[T]) -> T:
        """The call's result, or ModelDown as soon as the service is known down (the call is then cancelled):
        a killed service's calls would otherwise wait for its restart."""
        call = asyncio.ensure_future(awaitable)
        went_down = asyncio.ensure_future(self._went_down.wait())
        try:
            await asyncio.wait({call, went_down}, return_when=asyncio.FIRST_COMPLETED)
            if call.done():
                return call.result()
            raise ModelDown(self.name)
        finally:
            went_down.cancel()
            call.cancel()  # nothing when it is done

    async def _watch(self) -> None:
        while True:
            await self._check()
            await asyncio.sleep(self.interval)

    async def _check(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.ping()
        except TimeoutError:
            if self.state == "unknown":
                # Never answered yet: still starting (BentoML holds its socket, so calls wait while it loads and
                # times its variants). Not ready, but its requests wait for it rather than get 503: another
                # gateway worker may already have found it up and made the server ready.
                self._set("unknown", f"no answer within {self.timeout:g}s: still starting")
                return
            self._set("down", f"no answer within {self.timeout:g}s")
        except Exception as exc:  # any failed call means it does not answer; the reason goes in the log line
            self._set("down", f"{type(exc).__name__}: {exc}")
        else:
            self._set("up")

    def _set(self, state: State, reason: str = "") -> None:
        self._decided.set()
        if state == self.state:
            if state == "unknown" and not self._said_starting:
                self._said_starting = True
                logger.info("model service %s is not answering yet (%s)", self.name, reason)
            return
        now = time.monotonic()
        if state == "down":
            self._went_down.set()
            logger.warning("model service %s is not answering (%s): not ready, its requests get 503", self.name, reason)
        elif self.state == "down":
            self._went_down = asyncio.Event()
            logger.warning("model service %s answers again after %.1fs", self.name, now - self._since)
        self.state, self._since = state, now


def is_connection_failure(exc: BaseException) -> bool:
    return isinstance(exc, aiohttp.ClientConnectionError | ConnectionError | TimeoutError)

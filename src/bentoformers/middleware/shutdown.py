"""On SIGTERM the gateway finishes what it has and refuses what comes (ShutdownDrain, below, holds the signal).

For a short grace after the signal it still serves what its clients had sent (each answer with
`Connection: close`); after it, until its requests in flight are done and it has been idle for a moment,
it answers every new request at once with 503, `Retry-After` and `Connection: close`: a keep-alive client
is told to go elsewhere instead of losing its next request to a connection closed under it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType, error_response


class ShutdownMiddleware:
    def __init__(
        self, app: ASGIApp, *, drain: ShutdownDrain, retry_after: int = 1, probe_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app, self.drain, self.retry_after = app, drain, retry_after
        self.probe_paths = probe_paths  # answered while draining, and never keeping a draining worker alive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.drain.draining and path == "/readyz":
            await error_response(ApiError(ErrorType.OVERLOADED, "shutting down"))(scope, receive, send)
        elif self.drain.refusing and path not in self.probe_paths:
            error = ApiError(
                ErrorType.OVERLOADED, "the server is shutting down; retry on another replica",
                headers={"Retry-After": str(self.retry_after), "Connection": "close"},
            )
            await error_response(error)(scope, receive, send)
        elif path in self.probe_paths:  # probes and scrapes do not keep a draining worker alive
            await self.app(scope, receive, send)
        else:
            with self.drain.busy():
                await self.app(scope, receive, self._closing(send))

    def _closing(self, send: Send) -> Send:
        """While draining (its grace), each answer tells the client to close its connection."""

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        return send_closing


class ShutdownDrain:
    """Keeps a model service process answering after SIGTERM/SIGINT until it has been idle for a moment.

    `bentoml serve` stops every service at once: without this the model service would close while the
    gateway still finishes its requests in flight (they would get 503). Here the process's own signal
    handler (uvicorn's graceful shutdown) runs only once no call has been active for `idle_seconds`, or
    after `max_seconds` (below the supervisor's 30 s before it kills). A second signal stops at once.
    """

    def __init__(self, idle_seconds: float = 1.0, max_seconds: float = 20.0, grace_seconds: float = 0.0) -> None:
        self.idle_seconds, self.max_seconds, self.grace_seconds = idle_seconds, max_seconds, grace_seconds
        self.active, self.last_call = 0, time.monotonic()
        self._lock = threading.Lock()  # busy() runs on the event loop and in the threads of sync methods
        self._draining, self._signalled = False, 0.0

    @contextmanager
    def busy(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1
                self.last_call = time.monotonic()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def refusing(self) -> bool:
        """Draining, and past the grace for requests its clients had sent before the signal."""
        return self._draining and time.monotonic() - self._signalled >= self.grace_seconds

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not under a test client)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if callable(previous):
                signal.signal(sig, self._handler(previous))

    def _handler(self, previous: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], None]:
        def on_signal(sig: int, frame: FrameType | None) -> None:
            if self._draining:
                previous(sig, frame)
                return
            self._draining, self._signalled = True, time.monotonic()
            threading.Thread(target=self._wait_then, args=(previous, sig), daemon=True).start()

        return on_signal

    def _wait_then(self, previous: Callable[[int, FrameType | None], Any], sig: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        while time.monotonic() < deadline and (
            not self.refusing or self.active or time.monotonic() - self.last_call < self.idle_seconds
        ):
            time.sleep(0.05)
        previous(sig, None)

"""On SIGTERM, a model service keeps answering while the gateway finishes its requests in flight, and the gateway
finishes its own (middleware/shutdown.py refuses new ones meanwhile)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


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

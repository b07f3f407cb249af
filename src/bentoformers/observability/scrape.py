"""The metrics page: every process's metrics (BentoML's multiprocess files, or this process's registry).

The gateway serves it at /metrics itself, with BentoML's HTTP metrics off there: those label every
request by its raw path, so a scan of random URLs grew the page without bound (5,000 paths: 20 MB, 13 s
to scrape). A model service started on its own serves it on a port of its own (`serve_metrics`), so a
scraper never needs its API port (middleware/internal.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger("bentoformers")
__all__ = ["CONTENT_TYPE_LATEST", "CachedPage", "latest", "serve_metrics"]


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def latest() -> bytes:
    return generate_latest(_registry())


class CachedPage:
    """The metrics page, rendered at most once per `ttl` seconds however many scrapes come (one render in flight,
    every scrape meanwhile waits for it), on a thread of its own: /metrics needs no credentials, so a flood of
    scrapes must cost neither a core (about 8 ms a render) nor the default executor that tokenizing and
    generation use."""

    def __init__(self, render: Callable[[], bytes] = latest, ttl: float = 1.0) -> None:
        self.render, self.ttl = render, ttl
        self._page, self._rendered = b"", float("-inf")
        self._pending: asyncio.Future[bytes] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="metrics")

    async def get(self) -> bytes:
        if time.monotonic() - self._rendered < self.ttl:
            return self._page
        if self._pending is None:
            self._pending = asyncio.get_running_loop().run_in_executor(self._thread, self.render)
            self._pending.add_done_callback(self._rendered_now)
        return await asyncio.shield(self._pending)  # a scraper that leaves does not cancel the others' render

    def _rendered_now(self, done: asyncio.Future[bytes]) -> None:
        self._pending = None
        if not done.cancelled() and done.exception() is None:
            self._page, self._rendered = done.result(), time.monotonic()


def serve_metrics(port: int) -> None:
    """The metrics page on 0.0.0.0:`port`, from a daemon thread."""
    try:
        start_http_server(port, registry=_registry())
    except OSError as exc:  # a restarted worker while the old socket lingers: metrics are not worth a crash
        logger.warning("could not serve metrics on port %d: %s", port, exc)
        return
    logger.info("metrics on port %d", port)

"""The metrics page: every process's metrics (BentoML's multiprocess files, or this process's registry).

The gateway serves it at /metrics itself, with BentoML's HTTP metrics off there: those label every
request by its raw path, so a scan of random URLs grew the page without bound (5,000 paths: 20 MB, 13 s
to scrape). A model service started on its own serves it on a port of its own (`serve_metrics`), so a
scraper never needs its API port (middleware/internal.py).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger("bentoformers")
__all__ = ["CONTENT_TYPE_LATEST", "latest", "serve_metrics"]


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def latest() -> bytes:
    return generate_latest(_registry())


def serve_metrics(port: int) -> None:
    """The metrics page on 0.0.0.0:`port`, from a daemon thread."""
    try:
        start_http_server(port, registry=_registry())
    except OSError as exc:  # a restarted worker while the old socket lingers: metrics are not worth a crash
        logger.warning("could not serve metrics on port %d: %s", port, exc)
        return
    logger.info("metrics on port %d", port)

"""A model service's /metrics on a port of its own, so a scraper never needs the API port (internal.py)."""

from __future__ import annotations

import logging
import os

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger("bentoformers")


def serve_metrics(port: int) -> None:
    """Every process's metrics (BentoML's multiprocess files) on 0.0.0.0:`port`, from a daemon thread."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:  # a restarted worker while the old socket lingers: metrics are not worth a crash
        logger.warning("could not serve metrics on port %d: %s", port, exc)
        return
    logger.info("metrics on port %d", port)

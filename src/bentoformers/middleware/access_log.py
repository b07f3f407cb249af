"""One JSON line per request on stdout, and the per-route request metrics.

It replaces BentoML's text access log on the gateway. The line is built from what the inner layers left
in scope["state"]: request_id (RequestIdMiddleware), identity (the auth middleware: only its id, never a
secret), model and tokens (the route handlers). The query string is never logged: clients put keys there.

Lines are written by a thread of their own, from a bounded queue: a write to stdout blocks once a pipe nobody
drains is full (64 KB), and from the event loop that froze the whole server, probes included. A line that
finds the queue full is dropped and counted (bentoformers_access_log_lines_dropped_total): serving never
waits on the log.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.observability import metrics

logger = logging.getLogger("bentoformers.access")
MAX_PATH_CHARS = 256


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; a full queue drops the record (and counts it) instead of waiting."""

    json_lines = True

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            metrics.access_log_lines_dropped.inc()


def _log_json_lines_to_stdout(queue_lines: int) -> None:
    logger.setLevel(logging.INFO)
    logger.propagate = False  # BentoML's root handler would wrap the JSON in its text format
    if not any(getattr(h, "json_lines", False) for h in logger.handlers):
        lines: queue.Queue = queue.Queue(maxsize=queue_lines)
        writer = logging.StreamHandler(sys.stdout)
        writer.setFormatter(logging.Formatter("%(message)s"))
        listener = logging.handlers.QueueListener(lines, writer)
        listener.start()
        atexit.register(_flush_at_exit, listener)
        logger.addHandler(_DroppingQueueHandler(lines))


def _flush_at_exit(listener: logging.handlers.QueueListener, seconds: float = 2.0) -> None:
    """Writes what is queued, for at most `seconds` (stdout may be a pipe nobody reads)."""
    try:
        listener.queue.put(listener._sentinel, timeout=seconds)
    except queue.Full:
        return
    if listener._thread is not None:
        listener._thread.join(seconds)


def route_label(scope: Scope, known_paths: frozenset[str]) -> str:
    """The route template that answered (Starlette records it in the scope), else a known path, else
    "other": unknown paths end in a catch-all route, so a scan of random URLs adds no series."""
    template = getattr(scope.get("route"), "path", None)
    if isinstance(template, str) and template.startswith("/") and ":path}" not in template:
        return template
    path = scope.get("path", "")
    return path if path in known_paths else "other"


def answered_status(scope: Scope, status: int | None) -> int:
    """The status sent, or for a request left unanswered 499 (the client left: set inside) or 500 (the app raised)."""
    return status if status is not None else (scope.get("state") or {}).get("status_if_unanswered", 500)


class AccessLogMiddleware:
    """Pure ASGI. Its own failures are logged and swallowed: a log line must never cost a request."""

    def __init__(
        self, app: ASGIApp, enabled: bool = True, *, known_paths: frozenset[str] = frozenset(),
        quiet_paths: frozenset[str] = frozenset(), queue_lines: int = 10_000,
    ) -> None:
        """`known_paths` keep their own metric label when refused before routing; `quiet_paths` (probes, the
        scrape) are logged only when they fail; `queue_lines`: lines waiting to be written, beyond which they
        are dropped (the first middleware of a process sets it)."""
        self.app = app
        self.enabled = enabled
        self.known_paths, self.quiet_paths = known_paths, quiet_paths
        # The metric series of each (route label, status): `labels()` takes a lock and builds a key per call, a
        # real share of a small request's CPU. Both parts are bounded, so the cache is too.
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}
        if enabled:
            _log_json_lines_to_stdout(queue_lines)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = None

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.requests_in_progress.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics.requests_in_progress.dec()
            try:
                self._record(scope, answered_status(scope, status), time.perf_counter() - start)
            except Exception:
                logging.getLogger("bentoformers").exception("access log failed")

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = route_label(scope, self.known_paths)
        series = self._series.get((route, status))
        if series is None:
            series = self._series[route, status] = (
                metrics.requests.labels(route, str(status)), metrics.request_seconds.labels(route)
            )
        series[0].inc()
        series[1].observe(seconds)
        if not self.enabled or (route in self.quiet_paths and status < 400):
            return
        state: dict[str, Any] = scope.get("state") or {}
        identity = state.get("identity")
        client = scope.get("client")
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "info",
            "logger": "bentoformers.access",
            "request_id": state.get("request_id"),
            "method": scope.get("method"),
            "path": scope.get("path", "")[:MAX_PATH_CHARS],
            "route": route,
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
            "model": state.get("model"),
            "tokens": state.get("tokens"),
            "identity": getattr(identity, "name", None),
            "client": client[0] if client else None,
        }
        if "trace_id" in state:  # exported (middleware/tracing.py): the line finds its trace
            line["trace_id"] = state["trace_id"]
        logger.info(orjson.dumps(line).decode())

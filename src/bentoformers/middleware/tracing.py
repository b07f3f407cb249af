"""A request's trace: `Server-Timing` on every answer, and its server span when export is on
(observability/tracing.py).

It replaces BentoML's OpenTelemetry layer on the gateway, which records the query string (where clients put
keys) and a span per ASGI message (one per token of a stream). Here: one span per request, named after its route,
with what the inner layers left in scope["state"] (model, task, items, tokens, the caller's id) as attributes.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.middleware.access_log import answered_status, route_label
from bentoformers.observability import tracing


class TracingMiddleware:
    def __init__(self, app: ASGIApp, *, known_paths: frozenset[str] = frozenset()) -> None:
        self.app, self.known_paths = app, known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracer = tracing.tracer()
        held = scope.get(tracing.HELD_SCOPE_KEY, 0.0)  # its client sent it that long ago (serving/connection_limits.py)
        span, context = _server_span(tracer, scope, held) if tracer is not None else (None, None)
        if span is not None:
            scope.setdefault("state", {})["trace_id"] = format(span.get_span_context().trace_id, "032x")
        trace = tracing.RequestTrace(span, context)
        if held:  # its time, and the queue's promise, count from then
            trace.started -= held
            trace.add("held", held)
        tracing.begin(trace)
        status = None

        async def send_with_timing(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"server-timing", trace.server_timing())]
            await send(message)

        try:
            # Current for the request's own task (and those it starts): log lines carry its ids.
            with tracing.current_span(span):
                await self.app(scope, receive, send_with_timing)
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
            raise
        finally:
            if span is not None:
                _finish(span, scope, status, route_label(scope, self.known_paths))


def _server_span(tracer: Any, scope: Scope, held: float = 0.0):
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind

    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())
               if name in (b"traceparent", b"tracestate")}
    span = tracer.start_span(
        str(scope.get("method", "GET")), context=propagate.extract(carrier),
        kind=SpanKind.SERVER, attributes={"http.request.method": scope.get("method", "")},
        start_time=time.time_ns() - int(held * 1e9) if held else None,
    )
    return span, trace.set_span_in_context(span)


def _finish(span: Any, scope: Scope, status: int | None, route: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    state: dict[str, Any] = scope.get("state") or {}
    status = answered_status(scope, status)
    span.update_name(f"{scope.get('method', 'GET')} {route}")
    attributes = {
        "http.route": route,
        "http.response.status_code": status,
        "bentoformers.model": state.get("model"),
        "bentoformers.task": state.get("task"),
        "bentoformers.items": state.get("items"),
        "bentoformers.input_tokens": state.get("tokens"),
        "bentoformers.output_tokens": state.get("output_tokens"),
        "bentoformers.request_id": state.get("request_id"),
    }
    identity = state.get("identity")
    if identity is not None:
        attributes["enduser.id"] = identity.name  # a key's id, a JWT subject, an anonymous address: no secret
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, str(status)))
    span.end()

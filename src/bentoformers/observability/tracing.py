"""Where a request's time went: `Server-Timing` on every answer, and OpenTelemetry spans when export is on.

Export is off unless the standard OpenTelemetry settings ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_SERVICE_NAME`, `OTEL_SDK_DISABLED`).
`bentoml_config` turns them into BentoML's own tracing configuration, so spans come from BentoML's tracer
provider (its resource, its parent-based ratio sampler, its batch exporter) and BentoML's client carries the
W3C `traceparent` to a model service in its own process: one trace holds both halves of a request.

The spans: one server span per request (middleware/tracing.py), and as its children `authenticate`,
`rate_limit`, `tokenize`, `queue` and `model call` (the gateway's batched call; its batch in the
attributes), then on the model side `inference` (size and padded tokens) or `generate` (time to first token
and decode steps as an event and attributes: never a span per token). Attributes name routes, models, counts
and the caller's id, never a credential, a prompt or an input text.

Timings go in a `RequestTrace` that the middleware puts in a context variable; its stages are what
`Server-Timing` reports, traced or not.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

TRACER_NAME = "bentoformers"
_EXPORT_SWITCHES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def sample_rate(environ: Mapping[str, str]) -> float:
    """OTEL_TRACES_SAMPLER(_ARG) as BentoML's one knob, a parent-based ratio. OpenTelemetry's default sampler
    (parentbased_always_on) samples every trace."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler.endswith("always_off"):
        return 0.0
    if sampler.endswith("traceidratio"):
        try:
            ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1]; got {environ['OTEL_TRACES_SAMPLER_ARG']!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1]; got {ratio}")
        return ratio
    if sampler.endswith("always_on"):
        return 1.0
    raise ValueError(
        f"OTEL_TRACES_SAMPLER={sampler!r} is not supported here: use always_on, always_off, traceidratio or their "
        "parentbased_ forms (BentoML samples by a parent-based ratio)"
    )


def bentoml_config(environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """BentoML's `tracing` service configuration from the OpenTelemetry settings, or None when export is off.
    The OTLP/HTTP exporter reads the endpoint (`/v1/traces` added to OTEL_EXPORTER_OTLP_ENDPOINT), its headers,
    timeout and compression from the same settings itself."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    if not any(environ.get(name) for name in _EXPORT_SWITCHES):
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol.strip().lower() != "http/protobuf":
        raise ValueError(f"OTLP protocol {protocol!r} is not supported here: traces are exported over http/protobuf")
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        raise RuntimeError(
            "OTEL_EXPORTER_OTLP_ENDPOINT asks for trace export, but opentelemetry-exporter-otlp-proto-http is not "
            "installed (pip install 'bentoformers[serve]')"
        )
    return {"exporter_type": "otlp", "sample_rate": sample_rate(environ), "otlp": {"protocol": "http"}}


@cache
def tracer():
    """BentoML's tracer when export is on in this process (its configuration: bentoml_config), else None: then
    no span is made at all, and the request path costs what it did without tracing."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    if not BentoMLContainer.config.tracing.exporter_type.get():
        return None
    if not BentoMLContainer.config.tracing.sample_rate.get():
        return None
    return BentoMLContainer.tracer_provider.get().get_tracer(TRACER_NAME)


HELD_SCOPE_KEY = "bentoformers.held_seconds"  # set by the connection (serving/connection_limits.py) on a request
# that waited, unread, for the Retry-After of a 503 its connection had just been sent


class RequestTrace:
    """One request's stages (seconds, for Server-Timing) and, when traced, its server span and the context
    its child spans hang from."""

    __slots__ = ("context", "span", "stages", "started")

    def __init__(self, span: Any = None, context: Any = None) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.span, self.context = span, context

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def first(self, stage: str, seconds: float) -> None:
        """A stage that counts once (the first token of several prompts' generations)."""
        self.stages.setdefault(stage, seconds)

    def server_timing(self) -> bytes:
        """The Server-Timing header: each stage so far and the total, in milliseconds."""
        self.stages["total"] = time.perf_counter() - self.started
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in self.stages.items()).encode()


_current: ContextVar[RequestTrace | None] = ContextVar("bentoformers_request_trace", default=None)


def current() -> RequestTrace | None:
    return _current.get()


def begin(trace: RequestTrace) -> None:
    """Makes `trace` the request's (the middleware's task and every task it starts, which copy the context)."""
    _current.set(trace)


@contextmanager
def stage(name: str, attributes: Mapping[str, Any] | None = None, *, timed: bool = True) -> Iterator[Any]:
    """A stage of the current request: timed into its Server-Timing (unless `timed` is False) and, traced, a
    child span of its server span (yielded; None when not traced)."""
    trace = _current.get()
    if trace is None:
        yield None
        return
    span = None
    if trace.context is not None:
        span = tracer().start_span(name, context=trace.context, attributes=attributes)
    started = time.perf_counter()
    try:
        yield span
    except BaseException as exc:
        if span is not None:
            _failed(span, exc)
        raise
    finally:
        if timed:
            trace.add(name, time.perf_counter() - started)
        if span is not None:
            span.end()


def span_of(trace: RequestTrace | None, name: str, attributes: Mapping[str, Any] | None = None):
    """A child span of a traced request that the caller ends (None when not traced): for stages that do not
    fit one block, such as a stream that outlives the call that opened it."""
    if trace is None or trace.context is None:
        return None
    return tracer().start_span(name, context=trace.context, attributes=attributes)


def start_span(name: str, attributes: Mapping[str, Any] | None = None):
    """A span that the caller ends, child of the current context (None when export is off): a model service's
    `generate`, whose caller's span is current when it starts."""
    return None if tracer() is None else tracer().start_span(name, attributes=attributes)


def end_span(span: Any, attributes: Mapping[str, Any], failure: BaseException | None = None) -> None:
    if span is None:
        return
    span.set_attributes(attributes)
    if failure is not None and not isinstance(failure, GeneratorExit):  # GeneratorExit: closed early, on purpose
        _failed(span, failure)
    span.end()


@contextmanager
def current_span(span: Any) -> Iterator[None]:
    """`span` current for the block, so a call made in it carries its traceparent (BentoML's client injects
    the current context). Only around code that awaits in this task, never across a generator's yield."""
    if span is None:
        yield
        return
    from opentelemetry import context, trace

    token = context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        context.detach(token)


def _failed(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.set_attribute("error.type", type(exc).__name__)


@contextmanager
def model_call(traces: Sequence[RequestTrace | None], queued_at: Sequence[float], attributes: Mapping[str, Any]) -> Iterator[None]:
    """One batched call of the gateway's queue (gateway/queue.py), made from the queue's own task: each traced
    request of the batch gets its `queue` span (from when it queued) and a `model call` span, the first one
    current during the call (its traceparent goes to the model service) and linked from the others."""
    if tracer() is None or not any(t is not None and t.context is not None for t in traces):
        yield
        return
    from opentelemetry.trace import Link, SpanKind

    now_ns, now = time.time_ns(), time.perf_counter()
    spans = []
    for trace, queued in zip(traces, queued_at, strict=True):
        if trace is None or trace.context is None:
            continue
        started_ns = now_ns - int((now - queued) * 1e9)
        tracer().start_span("queue", context=trace.context, start_time=started_ns).end(end_time=now_ns)
        links = [Link(spans[0].get_span_context())] if spans else None
        spans.append(tracer().start_span(
            "model call", context=trace.context, kind=SpanKind.CLIENT, attributes=attributes, links=links,
            start_time=now_ns,
        ))
    try:
        with current_span(spans[0]):
            yield
    except BaseException as exc:
        for span in spans:
            _failed(span, exc)
        raise
    finally:
        for span in spans:
            span.end()


@contextmanager
def model_side(name: str, attributes: Mapping[str, Any], own_process: bool) -> Iterator[None]:
    """A model service's span around `name` (its batch's inference). In the gateway's process it runs in the
    `model call` span's context: a child of it. In a process of its own, BentoML's batcher may merge the calls
    of several requests and runs the merged batch in a task of its own, so the span starts a trace of its own
    rather than hang from whichever request started that task; each request's model-side server span (BentoML's,
    joined by traceparent) shows its time there."""
    if tracer() is None:
        yield
        return
    from opentelemetry import context

    parent = context.Context() if own_process else None
    with tracer().start_as_current_span(name, context=parent, attributes=attributes):
        yield

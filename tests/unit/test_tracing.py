"""Tracing's settings (the standard OpenTelemetry ones, as BentoML's tracing configuration), Server-Timing, and the
gateway's server span, on a small app under TracingMiddleware with the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentoformers.middleware.tracing import TracingMiddleware
from bentoformers.observability import tracing
from bentoformers.security.identity import Identity


def test_export_is_off_unless_an_otlp_endpoint_is_set():
    assert tracing.bentoml_config({}) is None
    assert tracing.bentoml_config({"OTEL_SERVICE_NAME": "x"}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing.bentoml_config(endpoint) == {"exporter_type": "otlp", "sample_rate": 1.0, "otlp": {"protocol": "http"}}
    assert tracing.bentoml_config({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) is not None
    assert tracing.bentoml_config({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.bentoml_config({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ValueError, match="http/protobuf"):
        tracing.bentoml_config({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


@pytest.mark.parametrize(("sampler", "arg", "rate"), [
    (None, None, 1.0),
    ("always_on", None, 1.0),
    ("parentbased_always_off", None, 0.0),
    ("traceidratio", "0.25", 0.25),
    ("parentbased_traceidratio", "0.01", 0.01),
    ("parentbased_traceidratio", None, 1.0),
])
def test_the_sampler_settings_become_bentomls_parent_based_ratio(sampler, arg, rate):
    environ = {k: v for k, v in {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": arg}.items() if v}
    assert tracing.sample_rate(environ) == rate


@pytest.mark.parametrize("environ", [
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
    {"OTEL_TRACES_SAMPLER": "jaeger_remote"},
])
def test_a_sampler_setting_that_cannot_be_honoured_is_refused_by_name(environ):
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        tracing.sample_rate(environ)


async def _embed(request):
    request.state.model, request.state.task, request.state.items, request.state.tokens = "m", "embeddings", 2, 9
    request.scope["state"]["identity"] = Identity("alice", frozenset({"*"}), "default", "key")
    with tracing.stage("tokenize"):
        pass
    return JSONResponse({"ok": True})


async def _fail(request):
    raise RuntimeError("boom")


def _app() -> TracingMiddleware:
    app = Starlette(routes=[Route("/v1/embeddings", _embed, methods=["POST"]), Route("/fail", _fail)])
    return TracingMiddleware(app, known_paths=frozenset({"/v1/embeddings"}))


@pytest.fixture
def exported(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    return exporter


def test_every_answer_says_where_its_time_went_traced_or_not():
    with TestClient(_app(), raise_server_exceptions=False) as client:
        answer = client.post("/v1/embeddings")
        stages = dict(part.split(";dur=") for part in answer.headers["server-timing"].split(", "))
        assert list(stages) == ["tokenize", "total"] and float(stages["total"]) >= float(stages["tokenize"]) >= 0
        assert "total;dur=" in client.get("/fail").headers["server-timing"]  # a 500 too


def test_one_server_span_per_request_named_after_its_route_joined_to_the_callers_trace(exported):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with TestClient(_app()) as client:
        client.post("/v1/embeddings?api_key=sk-secret", headers={"traceparent": parent, "authorization": "Bearer sk-x"})
    spans = {span.name: span for span in exported.get_finished_spans()}
    assert set(spans) == {"tokenize", "POST /v1/embeddings"}
    server = spans["POST /v1/embeddings"]
    assert format(server.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(server.parent.span_id, "016x") == "b7ad6b7169203331"
    assert spans["tokenize"].parent.span_id == server.context.span_id
    assert dict(server.attributes) == {
        "http.request.method": "POST", "http.route": "/v1/embeddings", "http.response.status_code": 200,
        "bentoformers.model": "m", "bentoformers.task": "embeddings", "bentoformers.items": 2,
        "bentoformers.input_tokens": 9, "enduser.id": "key:alice",
    }
    assert "sk-" not in repr([dict(s.attributes) for s in spans.values()])


def test_a_failed_request_and_an_unknown_path_keep_their_span_bounded(exported):
    with TestClient(_app(), raise_server_exceptions=False) as client:
        client.get("/fail")
        client.get("/" + "x" * 5000)
    names = [span.name for span in exported.get_finished_spans()]
    assert names == ["GET /fail", "GET other"]
    failed = exported.get_finished_spans()[0]
    assert failed.status.status_code.name == "ERROR" and failed.attributes["http.response.status_code"] == 500

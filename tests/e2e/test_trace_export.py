"""OpenTelemetry traces, exported over OTLP/HTTP to a real receiver started here (its protobuf payloads decoded),
from a real split serve (`BENTOFORMERS_MODEL_PROCESS=separate`): one embeddings request and one streamed chat
each form one trace across the gateway and the model service, with the spans that explain their latency and no
secret or text in any of them."""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest
from helpers import running_server

from bentoformers.security.keys import create_key
from bentoformers.tools.traces import Receiver, waterfall

SERVE = [sys.executable, "-m", "bentoformers.cli", "serve"]
SECRET_TEXT = "the password of the vault is swordfish"
CHAT_TEXT = "tell me about the lighthouse keeper"


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced(served_build, receiver, tmp_path_factory):
    work = tmp_path_factory.mktemp("traced")
    key, _ = create_key("tracer-test", ["*"], "default", work / "keys.yaml")
    env = {
        **os.environ, "BENTOFORMERS_MODEL_PROCESS": "separate", "BENTOFORMERS_MODELS": "minilm,chat",
        "BENTOFORMERS_API_KEYS_FILE": str(work / "keys.yaml"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    with running_server(SERVE, work / "serve.log", env) as running:
        yield running, key


@pytest.fixture(scope="module")
def traced_in_gateway(served_build, receiver, tmp_path_factory):
    """The CPU default: the model in the gateway's process."""
    work = tmp_path_factory.mktemp("traced-in-gateway")
    env = {**os.environ, "BENTOFORMERS_MODEL_PROCESS": "gateway", "BENTOFORMERS_MODELS": "minilm",
           "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "200",
           "OTEL_SERVICE_NAME": "embedder"}
    with running_server(SERVE, work / "serve.log", env) as running:
        yield running.url


def _arrived(spans: list[dict], root_name: str, service: str, name: str) -> bool:
    """The request's server span and, in its trace, the span `name` of the model service `service`."""
    roots = {s["trace"] for s in spans if s["name"] == root_name and s["kind"] == 2}
    return any(s["trace"] in roots and s["service"] == service and s["name"] == name for s in spans)


def _trace_of(spans: list[dict], root_name: str) -> list[dict]:
    (root,) = [s for s in spans if s["name"] == root_name and s["kind"] == 2]  # SPAN_KIND_SERVER
    return [s for s in spans if s["trace"] == root["trace"]]


def _one(spans: list[dict], name: str, **where) -> dict:
    found = [s for s in spans if s["name"] == name and all(s["attributes"].get(k) == v for k, v in where.items())]
    assert len(found) == 1, (name, where, [(s["name"], s["attributes"]) for s in spans])
    return found[0]


def _children(spans: list[dict], parent: dict) -> set[str]:
    return {s["name"] for s in spans if s["parent"] == parent["id"]}


def test_an_embeddings_request_is_one_trace_across_the_gateway_and_the_model_service(traced, receiver):
    url, key = traced[0].url, traced[1]
    answer = httpx.post(
        f"{url}/v1/embeddings?api_key={key}", json={"model": "minilm", "input": [SECRET_TEXT, "and another"]},
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    )
    assert answer.status_code == 200, answer.text
    stages = dict(part.split(";dur=") for part in answer.headers["server-timing"].split(", "))
    assert {"authenticate", "tokenize", "queue", "inference", "total"} <= set(stages)
    assert float(stages["total"]) >= float(stages["inference"]) > 0

    spans = receiver.wait_for(lambda spans: _arrived(spans, "POST /v1/embeddings", "model-minilm", "POST /embed") and any(
        s["name"] == "inference" and s["attributes"].get("bentoformers.batch.items") == 2 for s in spans
    ))
    trace = _trace_of(spans, "POST /v1/embeddings")
    root = _one(trace, "POST /v1/embeddings")
    assert root["parent"] == ""
    assert root["attributes"] | {
        "http.route": "/v1/embeddings", "http.response.status_code": 200, "bentoformers.model": "minilm",
        "bentoformers.task": "embeddings", "bentoformers.items": 2, "enduser.id": "key:tracer-test",
    } == root["attributes"]
    assert root["attributes"]["bentoformers.input_tokens"] > 2
    assert {"authenticate", "tokenize", "queue", "model call"} <= _children(trace, root)
    call = _one(trace, "model call")
    assert call["kind"] == 3 and call["attributes"]["bentoformers.batch.items"] == 2  # SPAN_KIND_CLIENT
    assert call["attributes"]["bentoformers.batch.padded_tokens"] >= root["attributes"]["bentoformers.input_tokens"]
    # The model service's half of the same trace, joined by the traceparent of the gateway's call.
    model_side = [s for s in trace if s["service"] == "model-minilm"]
    assert model_side and any(s["parent"] == call["id"] for s in model_side)
    assert {s["service"] for s in trace} == {"bentoformers", "model-minilm"}
    # The batch the model service ran (BentoML may merge several requests' calls into it: a trace of its own).
    inference = [s for s in spans if s["name"] == "inference"]
    assert any(s["attributes"]["bentoformers.batch.items"] == 2 and s["attributes"]["bentoformers.model"] == "minilm"
               for s in inference)
    # The access log line of the request names its trace.
    lines = [json.loads(line) for line in traced[0].log.read_text().splitlines() if line.startswith('{"time"')]
    assert any(line["route"] == "/v1/embeddings" and line.get("trace_id") == root["trace"] for line in lines)
    picture = waterfall(trace)  # python -m bentoformers.tools.traces prints the same
    print(picture)
    rows = picture.splitlines()[1:]
    assert rows[0].split()[1:3] == ["POST", "/v1/embeddings"] and len(rows) == len(trace)
    assert any(row.split()[1] == "model" and "items=2" in row for row in rows)
    _no_secret_in(spans, key)


def test_a_streamed_chat_is_one_trace_with_time_to_first_token_and_no_span_per_token(traced, receiver):
    url, key = traced[0].url, traced[1]
    body = {"model": "chat", "messages": [{"role": "user", "content": CHAT_TEXT}], "max_tokens": 24, "stream": True,
            "seed": 3}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as answer:
        assert answer.status_code == 200
        assert "first_token;dur=" in answer.headers["server-timing"]
        chunks = [line for line in answer.iter_lines() if line.startswith("data: {")]
    assert chunks

    spans = receiver.wait_for(lambda spans: _arrived(spans, "POST /v1/chat/completions", "model-chat", "generate"))
    trace = _trace_of(spans, "POST /v1/chat/completions")
    root = _one(trace, "POST /v1/chat/completions")
    assert root["attributes"]["bentoformers.model"] == "chat" and root["attributes"]["bentoformers.task"] == "generation"
    assert {"authenticate", "tokenize", "generate"} <= _children(trace, root)
    (gateway_generate,) = [s for s in trace if s["name"] == "generate" and s["service"] == "bentoformers"]
    (model_generate,) = [s for s in trace if s["name"] == "generate" and s["service"] == "model-chat"]
    assert gateway_generate["parent"] == root["id"] and gateway_generate["attributes"]["bentoformers.choices"] == 1
    assert [name for name, _, _ in gateway_generate["events"]] == ["first_token"]
    assert [name for name, _, _ in model_generate["events"]] == ["first_token"]
    assert model_generate["events"][0][1]["bentoformers.time_to_first_token_ms"] > 0
    steps = model_generate["attributes"]["bentoformers.decode_steps"]
    assert 1 <= steps <= 24 and model_generate["attributes"]["bentoformers.generated_tokens"] == steps
    # The model service's server span hangs from the gateway's generate span: one trace, with no span per token
    # (BentoML's per-message spans are off) however many chunks streamed.
    server_side = [s for s in trace if s["service"] == "model-chat" and s["kind"] == 2]
    assert len(server_side) == 1 and server_side[0]["parent"] == gateway_generate["id"]
    assert len(trace) < 12, sorted(s["name"] for s in trace)
    print(waterfall(trace))
    _no_secret_in(spans, key)


def test_with_the_model_in_the_gateways_process_its_batch_is_a_child_of_the_call(traced_in_gateway, receiver):
    answer = httpx.post(f"{traced_in_gateway}/embed", json={"inputs": ["one text", "two texts", "three"]}, timeout=60)
    assert answer.status_code == 200
    spans = receiver.wait_for(lambda spans: any(s["name"] == "POST /embed" and s["service"] == "embedder" for s in spans))
    trace = _trace_of([s for s in spans if s["service"] == "embedder"], "POST /embed")
    call = _one(trace, "model call")
    inference = _one(trace, "inference")
    assert inference["parent"] == call["id"] and inference["attributes"]["bentoformers.batch.items"] == 3
    assert call["start"] <= inference["start"] <= inference["end"] <= call["end"]


def test_an_error_answer_carries_server_timing_too(traced):
    url = traced[0].url
    answer = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}, timeout=30)
    assert answer.status_code == 401
    assert "total;dur=" in answer.headers["server-timing"]


def _no_secret_in(spans: list[dict], key: str) -> None:
    words = [key, key[-12:], "swordfish", "lighthouse", "Bearer"]
    text = json.dumps(spans, default=str)
    assert not [word for word in words if word in text]

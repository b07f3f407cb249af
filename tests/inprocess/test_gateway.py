"""The real service in process: Gateway.to_asgi() with the model service instantiated locally."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from helpers import post


def test_openai_embeddings_shape_and_real_token_usage(client):
    r = post(client, "/v1/embeddings", {"input": ["hello world", "a longer sentence about cats"], "model": "minilm"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1]
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # [CLS] hello world [SEP] = 4, [CLS] a longer sentence about cats [SEP] = 7
    assert body["usage"] == {"prompt_tokens": 11, "total_tokens": 11}


def test_base64_encoding_carries_the_same_floats(client):
    floats = post(client, "/v1/embeddings", {"input": "same text"}).json()["data"][0]["embedding"]
    b64 = post(client, "/v1/embeddings", {"input": "same text", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b64), dtype="<f4"), np.array(floats, dtype=np.float32))


def test_native_embed_normalize_and_truncate(client):
    raw = post(client, "/embed", {"inputs": "cats purr", "normalize": False}).json()["embeddings"][0]
    unit = post(client, "/embed", {"inputs": ["cats purr"]}).json()["embeddings"][0]
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
    np.testing.assert_allclose(np.array(raw) / np.linalg.norm(raw), unit, atol=1e-6)
    long_text = "word " * 400
    r = post(client, "/embed", {"inputs": [long_text], "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256


def test_models_lists_every_served_model_with_task_precision_and_device(client, served_build):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    entries = {e["id"]: e for e in body["data"]}
    assert list(entries) == ["minilm", "sentiment", "gpt2", "rerank", "ner", "nli", "chat", "e5", "splade"]
    assert {name: e["task"] for name, e in entries.items()} == {
        "minilm": "embeddings", "sentiment": "classification", "gpt2": "generation", "rerank": "rerank",
        "ner": "token-classification", "nli": "classification", "chat": "generation", "e5": "embeddings",
        "splade": "sparse-embeddings",
    }
    assert all(e["device"] == "cpu" and e["object"] == "model" for e in entries.values())
    # The tests serve gpt2 and nli in fp32 through BENTOFORMERS_MODEL_PRECISIONS (conftest), and chat and e5 are
    # built in fp32 only. The others serve the fastest built variant that holds on this CPU, and say so.
    assert {name: entries[name]["precision"] for name in ("gpt2", "chat", "e5", "nli")} == dict.fromkeys(
        ("gpt2", "chat", "e5", "nli"), "fp32")
    for name in ("minilm", "sentiment", "rerank", "ner", "splade"):
        entry = entries[name]
        holding = {p for p, result in served_build[name].items() if result.ok}
        assert entry["precision"] in holding and set(entry["variant_timings"]) <= holding, (name, entry)
        assert entry["chosen_because"].startswith(("the fastest that holds", "the only variant that holds"))
    assert entries["minilm"]["dimensions"] == 384
    assert entries["sentiment"]["labels"] == ["negative", "positive"] and entries["sentiment"]["multi_label"] is False
    assert entries["sentiment"]["zero_shot"] is False and entries["nli"]["zero_shot"] is True
    assert entries["ner"]["labels"][0] == "O" and entries["rerank"]["max_input_tokens"] == 128
    assert entries["gpt2"]["context_length"] == 128


def test_probes_answer(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


LONG = "word " * 300
BAD_REQUESTS = [
    # (route, body, status, error type, param)
    ("/v1/embeddings", {"input": []}, 422, "validation_error", "input"),
    ("/v1/embeddings", {"input": ""}, 422, "validation_error", "input.0"),
    ("/v1/embeddings", {"input": ["ok", "   "]}, 422, "validation_error", "input.1"),
    ("/v1/embeddings", {"input": ["x"] * 257}, 413, "request_too_large", "input"),
    ("/v1/embeddings", {"input": ["short", LONG]}, 413, "request_too_large", "input.1"),
    ("/v1/embeddings", {"input": 42}, 422, "validation_error", "input"),
    ("/v1/embeddings", {"input": ["ok", 3]}, 422, "validation_error", "input.1"),
    ("/v1/embeddings", {"input": "ok", "encoding_format": "int4"}, 422, "validation_error", "encoding_format"),
    ("/v1/embeddings", {"input": "ok", "dimensions": 128}, 400, "invalid_request_error", "dimensions"),
    ("/v1/embeddings", {"input": "ok", "model": "gpt-9"}, 404, "not_found_error", "model"),
    ("/v1/embeddings", {"input": "ok", "model": "sentiment"}, 400, "invalid_request_error", "model"),
    ("/classify", {"inputs": "ok", "model": "minilm"}, 400, "invalid_request_error", "model"),
    ("/classify", {"inputs": "ok", "model": "nope"}, 404, "not_found_error", "model"),
    ("/classify", {"inputs": []}, 422, "validation_error", "inputs"),
    ("/classify", {"inputs": ["ok", " "]}, 422, "validation_error", "inputs.1"),
    ("/classify", {"inputs": "ok", "top_k": 0}, 422, "validation_error", "top_k"),
    ("/classify", {"inputs": "ok", "top_k": "2"}, 422, "validation_error", "top_k"),
    ("/classify", {"inputs": "word " * 200}, 413, "request_too_large", "inputs.0"),
    ("/v1/embeddings", b"{not json", 400, "invalid_request_error", None),
    ("/v1/embeddings", b'{"input": "\xff\xfe"}', 400, "invalid_request_error", None),
    ("/v1/embeddings", b"[1, 2]", 422, "validation_error", None),
    ("/v1/embeddings", b"", 400, "invalid_request_error", None),
    ("/embed", {"inputs": ["ok"], "normalise": True}, 422, "validation_error", "normalise"),
    ("/embed", {"inputs": ["ok"], "truncate": "yes"}, 422, "validation_error", "truncate"),
    ("/embed", {"text": "ok"}, 422, "validation_error", "inputs"),
]


@pytest.mark.parametrize("route,body,status,kind,param", BAD_REQUESTS)
def test_bad_input_gets_a_clear_4xx_in_the_one_error_body(client, route, body, status, kind, param):
    r = post(client, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind and error["param"] == param and error["message"]
    assert r.headers["x-request-id"]


def test_too_long_names_the_limit(client):
    message = post(client, "/v1/embeddings", {"input": LONG}).json()["error"]["message"]
    assert "limit of 256" in message and "truncate" in message


def test_unknown_route_uses_the_error_body(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_request_id_is_echoed_or_made(client):
    r = post(client, "/embed", {"inputs": "x"}, )
    assert len(r.headers["x-request-id"]) == 32
    r = client.post("/embed", json={"inputs": "x"}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_each_queue_starts_with_its_model_services_measured_rate(client):
    """The model service times its variant at start-up (tokens_per_second in /v1/models); the gateway's health
    call hands that rate to the model's queue, so the first burst is bounded by time (gateway/queue.py)."""
    import service

    assert client.get("/readyz").status_code == 200
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    chooser = service.Gateway.inner._asgi.state.chooser
    for name in ("minilm", "sentiment", "rerank"):
        assert models[name]["tokens_per_second"] > 0
        assert chooser.models[name].coalescer.tokens_per_second is not None

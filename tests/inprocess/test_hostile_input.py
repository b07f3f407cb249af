"""Hostile and unlucky requests in process (the real app and model services): bodies that are not JSON, texts
of invisible characters, oversized requests, a model service that fails, a sequence whose prefill fails."""

from __future__ import annotations

import concurrent.futures
import logging

import httpx
import orjson
import pytest
from bentoml.exceptions import BentoMLException, ServiceUnavailable


@pytest.fixture(scope="module")
def gateway(client):
    import service

    return service.Gateway.inner._asgi.state.chooser


def post(client, path, body, content_type="application/json"):
    headers = {"content-type": content_type} if content_type else {}
    return client.post(path, content=orjson.dumps(body), headers=headers)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
@pytest.mark.parametrize("route,body", [("/embed", {"inputs": "hi"}), ("/generate", {"prompt": "hi"})])
def test_a_body_not_declared_json_gets_415_in_the_one_error_body(client, route, body, content_type):
    r = post(client, route, body, content_type)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["type"] == "unsupported_media_type" and "application/json" in r.json()["error"]["message"]
    assert post(client, route, body, "application/json; charset=utf-8").status_code == 200


INVISIBLE = ["\u0000", "\u0000" * 50, "\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \u200b\t\u00ad\n", "\U000e0041"]


@pytest.mark.parametrize("text", INVISIBLE, ids=lambda t: "+".join(f"U{ord(c):04X}" for c in t[:5]))
def test_texts_of_only_invisible_characters_are_empty(client, text):
    for route, body, param in [("/embed", {"inputs": ["fine", text]}, "inputs.1"),
                               ("/v1/embeddings", {"input": text}, "input.0"),
                               ("/classify", {"inputs": text}, "inputs.0"),
                               ("/generate", {"prompt": text}, "prompt")]:
        r = post(client, route, body)
        assert r.status_code == 422, (route, r.text)
        assert r.json()["error"]["param"] == param and "empty" in r.json()["error"]["message"]
    assert post(client, "/embed", {"inputs": "caf\u00e9 \u200b ok"}).status_code == 200  # visible text, with a ZWSP


def test_a_request_of_many_long_texts_is_refused_before_tokenizing_and_truncate_cuts_first(client, gateway):
    texts = ["word " * 3000] * 256  # 256 x 15,000 characters: 12.5 s of tokenizing before this limit
    r = post(client, "/embed", {"inputs": texts})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "inputs" and "at most 1048576" in r.json()["error"]["message"]
    # With truncate, each text is cut to 256 tokens x 16 characters first: the same answer as the whole
    # text, since its first 256 tokens lie well inside the cut.
    cut = post(client, "/embed", {"inputs": texts[:4], "truncate": True})
    assert cut.status_code == 200, cut.text
    endpoint = gateway.models["minilm"]
    whole = endpoint.tokenizer.encode(texts[:1], True)
    assert cut.json()["usage"]["total_tokens"] == 4 * len(whole[0])


@pytest.mark.parametrize("failure,status,kind", [
    (httpx.ConnectError("connection refused"), 503, "overloaded_error"),
    (ServiceUnavailable("shed by the batcher"), 503, "overloaded_error"),
    (BentoMLException("model service bug", error_code=500), 500, "server_error"),
    (ValueError("a bug"), 500, "server_error"),
], ids=["unreachable", "shedding", "model-service-500", "bug"])
def test_only_an_unavailable_model_service_is_a_retryable_503(client, gateway, monkeypatch, caplog, failure, status,
                                                             kind):
    endpoint = gateway.models["minilm"]

    async def failing(ids):
        raise failure

    monkeypatch.setattr(endpoint, "_call", failing)  # the model service, as the gateway meets it
    with caplog.at_level(logging.WARNING, logger="bentoformers.gateway"):
        r = post(client, "/embed", {"inputs": ["one", "two"]})
    assert r.status_code == status and r.json()["error"]["type"] == kind, r.text
    assert ("retry-after" in r.headers) == (status == 503)  # a bug is not worth retrying
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == (1 if status == 500 else 0), [rec.getMessage() for rec in caplog.records]


def test_a_sequence_whose_prefill_fails_ends_alone(client, monkeypatch):
    import service

    scheduler = service.Gateway.inner._asgi.state.models["gpt2"].scheduler
    prefill = scheduler.decoder.prefill
    poison = None

    def prefill_failing_on_one_prompt(ids):
        if ids == poison:
            raise RuntimeError("this prompt's prefill fails")
        return prefill(ids)

    monkeypatch.setattr(scheduler.decoder, "prefill", prefill_failing_on_one_prompt)
    gateway = service.Gateway.inner._asgi.state.chooser
    poison = gateway.models["gpt2"].tokenizer.ids("poison")
    prompts = ["The cat sat on", "Rain fell over the", "poison", "She opened the door and", "A good"]

    def generate(prompt):
        return post(client, "/generate", {"prompt": prompt, "max_new_tokens": 24})

    alone = {p: generate(p).json()["text"] for p in prompts if p != "poison"}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = dict(zip(prompts, pool.map(generate, prompts)))
    bad = together.pop("poison")
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"  # a bug: not retried as a 503
    assert {p: r.json()["text"] for p, r in together.items()} == alone  # its neighbours never noticed

"""bentoformers.Client and AsyncClient against the real app in process (Gateway.to_asgi())."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

import bentoformers
from bentoformers.client import AsyncClient, Client


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as http, Client("http://testserver", http_client=http) as c:
        yield c


def test_embed_one_text_and_a_list(client):
    one = client.embed("The cat sat on the mat.")
    assert one.model == "minilm" and len(one.embeddings) == 1 and len(one.embeddings[0]) == 384
    both = client.embed(["The cat sat on the mat.", "A feline rested on a rug."])
    a, b = np.array(both.embeddings)
    np.testing.assert_allclose(a, one.embeddings[0], atol=1e-6)
    assert 0.4 < float(a @ b) < 0.99
    assert both.usage.prompt_tokens == both.usage.total_tokens > 10


def test_normalize_false_gives_the_raw_pooled_vector(client):
    raw = np.array(client.embed("cats purr", normalize=False).embeddings[0])
    assert abs(np.linalg.norm(raw) - 1) > 1e-3


def test_a_list_longer_than_the_server_takes_is_split_and_joined(client, sentences):
    assert client.max_items_per_request() == 256  # read from GET /v1/models
    texts = sentences[:300]
    result = client.embed(texts, truncate=True)
    assert len(result.embeddings) == 300
    # Order kept across the split: each vector is the one the text gets alone.
    for i in (0, 255, 256, 299):
        np.testing.assert_array_equal(result.embeddings[i], client.embed(texts[i], truncate=True).embeddings[0])
    separate = sum(client.embed(texts[i : i + 100], truncate=True).usage.total_tokens for i in range(0, 300, 100))
    assert result.usage.total_tokens == separate


def test_results_and_errors_say_where_the_servers_time_went(client, sentences):
    one = client.embed("The cat sat on the mat.")
    assert {"tokenize", "queue", "inference", "total"} <= set(one.server_timing)
    assert one.server_timing["total"] >= one.server_timing["inference"] > 0
    split = client.embed(sentences[:300], truncate=True)  # two requests: their stages summed
    assert split.server_timing["total"] > split.server_timing["inference"] > 0
    with pytest.raises(bentoformers.BadRequestError) as refused:
        client.embed("")
    assert refused.value.server_timing["total"] > 0
    generated = client.generate("Rain fell over the", model="gpt2", max_new_tokens=4)
    assert {"tokenize", "first_token", "generate", "total"} <= set(generated.server_timing)


def test_models(client):
    (model,) = [m for m in client.models() if m.id == "minilm"]
    assert (model.id, model.task, model.device) == ("minilm", "embeddings", "cpu")
    assert model.precision in ("int8", "fp32")  # the fastest that holds on this CPU (runtime/selfcheck.py)
    assert model.model_extra["dimensions"] == 384


def test_bad_input_raises_with_the_servers_message(client):
    with pytest.raises(bentoformers.BadRequestError) as caught:
        client.embed(["fine", "   "])
    exc = caught.value
    assert (exc.status_code, exc.type, exc.param) == (422, "validation_error", "inputs.1")
    assert exc.message == "inputs[1] is empty" and exc.request_id


def test_too_long_raises_request_too_large_naming_the_limit(client):
    with pytest.raises(bentoformers.RequestTooLargeError) as caught:
        client.embed("word " * 300)
    assert caught.value.status_code == 413 and "limit of 256" in caught.value.message


def test_unknown_model_raises_not_found(client):
    with pytest.raises(bentoformers.NotFoundError, match="not served here"):
        client.embed("x", model="gpt-9")


def test_async_client_over_asgi_transport(app, sentences):
    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with AsyncClient("http://testserver", transport=transport) as c:
                models = await c.models()
                result = await c.embed(sentences[:260], truncate=True)
                with pytest.raises(bentoformers.NotFoundError):
                    await c.embed("x", model="nope")
                return models, result

    models, result = asyncio.run(main())
    assert "minilm" in [m.id for m in models]
    assert len(result.embeddings) == 260 and len(result.embeddings[259]) == 384

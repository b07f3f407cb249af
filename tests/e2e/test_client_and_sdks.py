"""bentoformers.Client/AsyncClient and the official OpenAI SDK against a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from helpers import free_port, running_server

import bentoformers


def test_client_against_a_real_server(server, sentences):
    with bentoformers.Client(server, timeout=30) as client:
        (model,) = [m for m in client.models() if m.id == "minilm"]
        assert model.task == "embeddings"
        result = client.embed(sentences[:270], truncate=True)  # over the 256 a request may hold
        assert len(result.embeddings) == 270
        np.testing.assert_array_equal(
            result.embeddings[260], client.embed(sentences[260], truncate=True).embeddings[0]
        )
        with pytest.raises(bentoformers.BadRequestError) as caught:
            client.embed("")
        assert caught.value.status_code == 422 and caught.value.param == "inputs.0"


def test_async_client_sends_concurrently(server, sentences):
    async def main():
        async with bentoformers.AsyncClient(server) as client:
            return await asyncio.gather(*(client.embed(t, truncate=True) for t in sentences[:32]))

    results = asyncio.run(main())
    assert [len(r.embeddings[0]) for r in results] == [384] * 32


def test_unreachable_server_raises_a_connection_error_after_bounded_retries():
    port = free_port()  # closed again: nothing listens there
    with bentoformers.Client(f"http://127.0.0.1:{port}", max_retries=2) as client:
        with pytest.raises(bentoformers.APIConnectionError):
            client.embed("x")


def test_openai_sdk_errors_and_async_client(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="gpt-9", input="x")
    assert caught.value.body["type"] == "not_found_error" and "minilm" in caught.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.embeddings.create(model="minilm", input=[])
    assert caught.value.body["param"] == "input"
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model="minilm", input="word " * 300)
    assert caught.value.status_code == 413 and "truncate" in caught.value.body["message"]
    # The SDK's own extension point for non-OpenAI fields passes `truncate` through.
    truncated = client.embeddings.create(model="minilm", input="word " * 300, extra_body={"truncate": True})
    assert truncated.usage.prompt_tokens == 256

    async def use_async():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.embeddings.create(model="minilm", input=f"text {i}") for i in range(8)))

    results = asyncio.run(use_async())
    assert all(len(r.data[0].embedding) == 384 for r in results)


@pytest.fixture(scope="module")
def guarded(minilm_path, tmp_path_factory):
    """A real server with API keys and a rate limit, started with `bentoformers keys create` and `serve` flags."""
    work = tmp_path_factory.mktemp("guarded")
    keys_file = work / "keys.yaml"
    cli = [sys.executable, "-m", "bentoformers.cli"]
    keys = {}
    for key_id, scope, tier in [("embedder", "embeddings", "three"), ("classifier", "classification", "three")]:
        made = subprocess.run([*cli, "keys", "create", "--id", key_id, "--scopes", scope, "--tier", tier,
                               "--file", str(keys_file)], capture_output=True, text=True, timeout=60, check=True)
        keys[key_id] = made.stdout.strip()
    serve = [*cli, "serve", "--api-keys-file", str(keys_file), "--rate-limit-tiers", '{"three": {"requests": "3/day"}}',
             "--no-access-log"]
    with running_server(serve, work / "serve.log", ready_timeout=120) as running:
        yield running.url, keys


def test_client_errors_from_a_server_with_keys_and_rate_limits(guarded):
    url, keys = guarded
    with bentoformers.Client(url) as anonymous, pytest.raises(bentoformers.AuthenticationError) as caught:
        anonymous.embed("x")
    assert caught.value.status_code == 401 and caught.value.type == "authentication_error"
    with bentoformers.Client(url, api_key=keys["embedder"] + "x") as wrong, pytest.raises(bentoformers.AuthenticationError):
        wrong.embed("x")
    with bentoformers.Client(url, api_key=keys["classifier"]) as other, pytest.raises(bentoformers.PermissionDeniedError):
        other.embed("x")
    with bentoformers.Client(url, api_key=keys["embedder"], retry_timeout=10) as client:
        for _ in range(3):
            assert len(client.embed("within the budget").embeddings[0]) == 384
        with pytest.raises(bentoformers.RateLimitError) as caught:
            client.embed("over the budget")
    # The server says when to come back (the day window): beyond the retry budget, so raised at once.
    assert caught.value.status_code == 429 and caught.value.retry_after > 60
    assert caught.value.type == "rate_limit_error" and caught.value.request_id

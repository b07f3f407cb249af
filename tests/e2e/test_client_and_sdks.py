"""bentoformers.Client/AsyncClient and the official OpenAI SDK against a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

import bentoformers

pytestmark = pytest.mark.slow


def test_client_against_a_real_server(server, sentences):
    with bentoformers.Client(server, timeout=30) as client:
        (model,) = client.models()
        assert model.id == "minilm" and model.task == "embeddings"
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
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

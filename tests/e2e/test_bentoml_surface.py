"""BentoML's own clients, the OpenAPI document and /docs against a real `bentoml serve` (MiniLM, `sentiment`,
`gpt2`): the methods call the routes, so they get the routes' answers, errors and metrics."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest


def _count(url: str, route: str, code: str) -> float:
    prefix = f'bentoformers_requests_total{{code="{code}",route="{route}"}}'
    lines = [ln for ln in httpx.get(f"{url}/metrics").text.splitlines() if ln.startswith(prefix)]
    return sum(float(ln.split()[-1]) for ln in lines)


def test_sync_client_has_the_methods_and_they_answer_like_the_routes(server, sentences):
    import bentoml
    from bentoml.exceptions import BentoMLException

    with bentoml.SyncHTTPClient(server) as client:
        embedded = client.embed(inputs=sentences[:3], truncate=True)
        direct = httpx.post(f"{server}/embed", json={"inputs": sentences[:3], "truncate": True}).json()
        assert embedded["model"] == "minilm" and embedded["usage"] == direct["usage"]
        np.testing.assert_allclose(embedded["embeddings"], direct["embeddings"], atol=1e-6)

        classified = client.classify(inputs=["I loved this film."], model="sentiment", top_k=1)
        assert [r[0]["label"] for r in classified["results"]] == [
            r[0]["label"] for r in httpx.post(f"{server}/classify", json={
                "inputs": ["I loved this film."], "model": "sentiment", "top_k": 1}).json()["results"]]

        tokens = client.tokenize(inputs=["cats purr"], model="e5", prompt_name="query")
        assert tokens == httpx.post(f"{server}/tokenize", json={"inputs": ["cats purr"], "model": "e5",
                                                                "prompt_name": "query"}).json()
        assert [t["text"] for t in tokens[0] if t["prompt"]] == ["query", ":"]

        before = _count(server, "/generate/stream", "200")
        pieces = list(client.generate(prompt="The cat sat on", model="gpt2", max_new_tokens=12))
        whole = httpx.post(f"{server}/generate", json={"prompt": "The cat sat on", "model": "gpt2",
                                                       "max_new_tokens": 12}, timeout=60).json()
        assert pieces and all(isinstance(p, str) for p in pieces)
        assert "".join(pieces) == whole["text"]  # greedy: the same tokens, streamed
        assert _count(server, "/generate/stream", "200") == before + 1  # counted (and logged) like any call

        # Our validation and our error body, through BentoML's exception.
        with pytest.raises(BentoMLException) as caught:
            client.embed(inputs=[])
        assert caught.value.error_code == 422
        assert orjson.loads(caught.value.message)["error"] == {
            "type": "validation_error", "message": "inputs must hold at least one text", "param": "inputs"}
        with pytest.raises(BentoMLException) as caught:
            client.generate(prompt="x", model="minilm").__next__()
        assert caught.value.error_code == 400 and "minilm" in orjson.loads(caught.value.message)["error"]["message"]


def test_async_client_methods(server, sentences):
    import bentoml

    async def main():
        async with bentoml.AsyncHTTPClient(server) as client:
            embedded = await asyncio.gather(*(client.embed(inputs=t, truncate=True) for t in sentences[:8]))
            pieces = [p async for p in client.generate(prompt="Once upon", model="gpt2", max_new_tokens=6)]
            return embedded, pieces

    embedded, pieces = asyncio.run(main())
    assert [len(e["embeddings"][0]) for e in embedded] == [384] * 8
    assert "".join(pieces) == httpx.post(f"{server}/generate", json={
        "prompt": "Once upon", "model": "gpt2", "max_new_tokens": 6}, timeout=60).json()["text"]


def test_openapi_and_docs_are_served_offline(server):
    document = httpx.get(f"{server}/openapi.json").json()
    assert document["openapi"] == "3.1.0" and "/embed" in document["paths"] and "/v1/completions" in document["paths"]
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: everything from this server
    for asset in ("/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"):
        r = httpx.get(f"{server}{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000 and asset in page.text
    schema = httpx.get(f"{server}/schema.json").json()
    assert {r["name"] for r in schema["routes"]} >= {"embed", "classify", "generate"}


def test_the_credentials_warning_is_said_once_per_start(server, tmp_path_factory):
    """By BentoML's arbiter, not again by the gateway worker and each model service's worker."""
    (log,) = tmp_path_factory.getbasetemp().glob("serve0/serve.log")  # the `server` fixture's log
    assert log.read_text(errors="replace").count("NO CREDENTIALS CONFIGURED") == 1

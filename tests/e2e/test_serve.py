"""A real `bentoml serve` of MiniLM, a tiny classifier and a tiny GPT-2 (separate model services behind one
gateway), called as users do: curl, the OpenAI SDK, BentoML's client."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
from helpers import ROOT


def test_openai_sdk_works_unchanged(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="minilm", input=["The cat sat on the mat.", "A feline rested on a rug."])
    a, b = (np.array(d.embedding) for d in result.data)
    assert a.shape == (384,) and result.usage.prompt_tokens > 10
    assert 0.4 < float(a @ b) < 0.99
    assert [m.id for m in client.models.list().data] == [
        "minilm", "sentiment", "gpt2", "rerank", "ner", "nli", "chat", "e5", "splade"
    ]


def test_openai_sdk_completions_plain_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="gpt2", prompt="The cat sat on", max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12
    chunks = list(client.completions.create(
        model="gpt2", prompt="The cat sat on", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len([c for c in chunks if c.choices]) > 1
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="minilm", prompt="hi")
    assert info.value.status_code == 400 and "embeddings model" in info.value.message


def test_curl_streams_server_sent_events_token_by_token(server):
    out = subprocess.run(
        ["curl", "-sN", f"{server}/generate", "-H", "Content-Type: application/json",
         "-d", '{"model": "gpt2", "prompt": "Rain fell over the", "max_new_tokens": 16, "stream": true}'],
        capture_output=True, text=True, timeout=60,
    )
    events = [e.removeprefix("data: ") for e in out.stdout.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    import json

    data = [json.loads(e) for e in events[:-1]]
    assert len(data) > 2 and data[-1]["finish_reason"] in ("stop", "length")
    whole = httpx.post(f"{server}/generate", json={"model": "gpt2", "prompt": "Rain fell over the", "max_new_tokens": 16})
    assert "".join(d["text"] for d in data) == whole.json()["text"]


def test_concurrent_requests_of_each_task_get_the_answers_they_get_alone(server, sentences):
    prompts = [" ".join(s.split()[:5]) for s in sentences[:8]]

    def generate(p):
        return httpx.post(f"{server}/generate", json={"prompt": p, "max_new_tokens": 24}, timeout=60).json()["text"]

    def classify(t):
        return httpx.post(f"{server}/classify", json={"inputs": t}, timeout=60).json()["results"][0]

    texts = sentences[:16]
    alone = [generate(p) for p in prompts], [classify(t) for t in texts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(generate, prompts)), list(pool.map(classify, texts))
    assert together == alone


def test_bentoml_client_works(server):
    import bentoml

    with bentoml.SyncHTTPClient(server, server_ready_timeout=30) as client:
        response = client.request("POST", "/embed", json={"inputs": ["hello from bentoml"]})
    assert response.status_code == 200
    assert len(response.json()["embeddings"][0]) == 384


def test_concurrent_requests_are_batched_without_changing_answers(server, sentences):
    texts = sentences[:48]
    alone = [httpx.post(f"{server}/embed", json={"inputs": [t], "truncate": True}).json()["embeddings"][0] for t in texts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(
            lambda t: httpx.post(f"{server}/embed", json={"inputs": [t], "truncate": True}).json()["embeddings"][0], texts
        ))
    np.testing.assert_array_equal(np.array(alone), np.array(together))


def _readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


# What each README curl example must answer, by route.
README_ANSWERS = {"/v1/embeddings": '"embedding', "/classify": '"results"', "/generate": '"text"', "/v1/models": '"task"',
                  "/v1/chat/completions": '"chat.completion', "/embed": '"embeddings"', "/tokenize": '"special"',
                  "/rerank": '"score"', "/v2/rerank": '"relevance_score"', "/ner": '"results"',
                  "/v2/embed": '"embeddings_by_type"', "/embed_sparse": '"index"'}


def test_readme_curl_examples_run(server):
    blocks = [b for b in _readme_blocks("bash") if b.lstrip().startswith("curl")]
    assert {route for b in blocks for route in README_ANSWERS if f"3000{route} " in b} == set(README_ANSWERS)
    for block in blocks:
        out = subprocess.run(
            ["bash", "-ec", block.replace("http://localhost:3000", server)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        (route,) = [r for r in README_ANSWERS if f"3000{r} " in block]
        assert README_ANSWERS[route] in out.stdout and '"error"' not in out.stdout, out.stdout[:500]


def test_readme_python_examples_run(server):
    blocks = _readme_blocks("python")
    assert blocks, "the README shows a Python example"
    for block in blocks:
        out = subprocess.run(
            [sys.executable, "-c", block.replace("http://localhost:3000", server)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-2000:]


def test_the_python_client_classifies_and_streams(server):
    from bentoformers import Client

    with Client(server) as client:
        result = client.classify(["I loved this film.", "Dreadful."], model="sentiment", top_k=1)
        assert result.model == "sentiment" and [len(r) for r in result.results] == [1, 1]
        whole = client.generate("The cat sat on", model="gpt2", max_new_tokens=10)
        chunks = list(client.generate_stream("The cat sat on", model="gpt2", max_new_tokens=10))
        assert "".join(c.text for c in chunks) == whole.text
        assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].usage == whole.usage
        assert {m.id: m.task for m in client.models()} == {
            "minilm": "embeddings", "sentiment": "classification", "gpt2": "generation", "rerank": "rerank",
            "ner": "token-classification", "nli": "classification", "chat": "generation", "e5": "embeddings",
        "splade": "sparse-embeddings",
        }

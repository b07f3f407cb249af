"""A real `bentoml serve` of the built default model, called as users do: curl, OpenAI SDK, BentoML's client."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_openai_sdk_works_unchanged(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="minilm", input=["The cat sat on the mat.", "A feline rested on a rug."])
    a, b = (np.array(d.embedding) for d in result.data)
    assert a.shape == (384,) and result.usage.prompt_tokens > 10
    assert 0.4 < float(a @ b) < 0.99
    assert [m.id for m in client.models.list().data] == ["minilm"]


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


def test_readme_curl_examples_run(server):
    blocks = [b for b in _readme_blocks("bash") if b.lstrip().startswith("curl")]
    assert blocks, "the README shows a curl example"
    for block in blocks:
        out = subprocess.run(
            ["bash", "-ec", block.replace("http://localhost:3000", server)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert '"embedding' in out.stdout, out.stdout[:500]


def test_readme_python_examples_run(server):
    blocks = _readme_blocks("python")
    assert blocks, "the README shows a Python example"
    for block in blocks:
        out = subprocess.run(
            [sys.executable, "-c", block.replace("http://localhost:3000", server)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-2000:]

"""A model service started on its own (`start-http-server --service-name=model-…`, as the gpu component runs it)
answers only the gateway: a pickled body from anyone else is refused before it is read (BentoML's internal
services unpickle what they get), any other call without the internal token gets 401."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import httpx
import pytest
from helpers import free_port, running_server

from bentoformers.middleware.internal import INTERNAL_TOKEN_HEADER, PICKLE_MEDIA_TYPE

TOKEN = "internal-test-token-" + "y" * 24


class _Touch:
    """Unpickling this creates a file: the proof that a body was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def model_alone(minilm_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("model-alone")
    metrics_port = free_port()
    env = {**os.environ, "BENTOFORMERS_MODELS": "minilm", "BENTOFORMERS_INTERNAL_TOKEN": TOKEN,
           "BENTOFORMERS_MODEL_PROCESS": "separate",
           "BENTOFORMERS_METRICS_PORT": str(metrics_port)}
    start = [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server", ".", "--service-name=model-minilm"]
    with running_server(start, work / "serve.log", env) as running:
        yield running.url, metrics_port, work


def test_a_pickled_body_without_the_token_is_refused_unread(model_alone):
    url, _, work = model_alone
    marker = work / "unpickled"
    for headers in ({}, {INTERNAL_TOKEN_HEADER: "wrong-" + TOKEN}):
        r = httpx.post(f"{url}/embed", content=pickle.dumps(_Touch(marker)),
                       headers={"Content-Type": PICKLE_MEDIA_TYPE, **headers}, timeout=30)
        assert r.status_code == 415, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert not marker.exists()


def test_every_other_call_needs_the_token(model_alone):
    url, metrics_port, _ = model_alone
    body = {"token_ids": [[101, 7592, 102]]}
    assert httpx.post(f"{url}/embed", json=body, timeout=30).status_code == 401
    assert httpx.post(f"{url}/embed", json=body, headers={INTERNAL_TOKEN_HEADER: TOKEN[:-1]}, timeout=30).status_code == 401
    assert httpx.post(f"{url}/describe", json={}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200  # the kubelet's probes need none
    ok = httpx.post(f"{url}/embed", json=body, headers={INTERNAL_TOKEN_HEADER: TOKEN}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()[0]) == 384
    # The metrics live on their own port, so a scraper never needs the API port.
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert scraped.status_code == 200 and "bentoformers_inference_seconds_count" in scraped.text


def test_random_paths_do_not_grow_its_metrics(model_alone):
    url, metrics_port, _ = model_alone
    for i in range(200):
        assert httpx.get(f"{url}/scan-{i}", timeout=30).status_code == 401
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    assert "scan-" not in scraped
    assert "bentoformers_inference_seconds_count" in scraped

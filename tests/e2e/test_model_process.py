"""Where the models run: in the gateway's process (the CPU default) or one process per model service (the GPU
split, `BENTOFORMERS_MODEL_PROCESS=separate`). Both are real `bentoml serve` runs of the same served list, and
they must give the same answers."""

from __future__ import annotations

import json
import os
import sys

import httpx
import psutil
import pytest
from helpers import running_server

SERVE = [sys.executable, "-m", "bentoformers.cli", "serve"]


@pytest.fixture(scope="module")
def split(served_build, server, tmp_path_factory):
    # Each service serves the fastest variant that holds, timed at start, so two servers on a busy box may
    # choose differently; the split is told the gateway-process server's choices so their answers can match.
    chosen = json.dumps({m["id"]: m["precision"] for m in _models(server)})
    env = {**os.environ, "BENTOFORMERS_MODEL_PROCESS": "separate", "BENTOFORMERS_MODEL_PRECISIONS": chosen}
    log = tmp_path_factory.mktemp("split") / "serve.log"
    with running_server(SERVE, log, env) as running:
        yield running


def _python_processes(proc) -> list[psutil.Process]:
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    return [p for p in tree if "python" in p.name().lower()]


def _answers(url: str, sentences: list[str]) -> dict[str, object]:
    post = lambda path, body: httpx.post(f"{url}{path}", json=body, timeout=60).json()  # noqa: E731
    return {
        "embed": post("/embed", {"inputs": sentences[:8], "truncate": True})["embeddings"],
        "classify": post("/classify", {"inputs": sentences[:8], "truncate": True})["results"],
        "generate": post("/generate", {"model": "gpt2", "prompt": "Rain fell over the", "max_new_tokens": 12})["text"],
        "models": sorted((m["id"], m["precision"], m["device"]) for m in _models(url)),
    }


def _models(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"]


def test_the_split_serves_what_the_gateway_process_serves(server, split, sentences):
    assert _answers(split.url, sentences) == _answers(server, sentences)


def test_the_split_runs_a_process_per_model_and_the_default_runs_one(server, split):
    served = len(_models(split.url))
    # The supervisor, the gateway worker, and one worker per model service.
    assert len(_python_processes(split.proc)) == 2 + served
    from bentoformers.tools.load import listening_pid

    gateway = psutil.Process(listening_pid(server))
    supervisor = gateway.parent()
    assert len(_python_processes(supervisor)) == 2  # the supervisor and the gateway worker, models inside

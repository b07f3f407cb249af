"""Graceful shutdown: SIGTERM to `bentoml serve` lets the requests in flight finish."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import time

import httpx
import pytest
from conftest import running_server

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model_process", ["gateway", "separate"])
def test_sigterm_finishes_the_requests_in_flight(minilm_path, sentences, tmp_path, model_process):
    serve = [sys.executable, "-m", "bentoml", "serve", "service:Gateway"]
    env = {**os.environ, "BENTOFORMERS_MODELS": "minilm", "BENTOFORMERS_MODEL_PROCESS": model_process}
    with running_server(serve, tmp_path / "serve.log", env) as running:
        url, proc = running.url, running.proc
        body = {"inputs": (sentences * 2)[:256], "truncate": True}  # a few hundred ms of model work each
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/embed", json=body, timeout=60) for _ in range(6)]
            time.sleep(0.3)  # in flight now
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        proc.wait(60)
        print(f"\nSIGTERM with 6 requests in flight: {codes}; server gone {time.monotonic() - sent:.1f}s later")
        assert codes == [200] * 6, running.log.read_text()[-3000:]

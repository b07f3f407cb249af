"""Graceful shutdown: SIGTERM to `bentoml serve` lets the requests in flight finish."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def test_sigterm_finishes_the_requests_in_flight(minilm_path, sentences, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:Gateway", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "BENTOFORMERS_MODELS": "minilm"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        body = {"inputs": (sentences * 2)[:256], "truncate": True}  # a few hundred ms of model work each
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/embed", json=body, timeout=60) for _ in range(6)]
            time.sleep(0.3)  # in flight now
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        proc.wait(60)
        print(f"\nSIGTERM with 6 requests in flight: {codes}; server gone {time.monotonic() - sent:.1f}s later")
        assert codes == [200] * 6, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

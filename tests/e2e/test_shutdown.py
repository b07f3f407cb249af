"""Graceful shutdown: SIGTERM to `bentoml serve` lets the requests in flight finish."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import time

import httpx
import pytest
from helpers import metric_value, running_server


# Both ways the models run: in the gateway's process (the CPU default) and in their own processes (the GPU default),
# where `bentoml serve` used to delete the unix socket to the model service at once (serving/composition.py).
@pytest.mark.parametrize("model_process", ["gateway", "separate"])
def test_sigterm_finishes_the_requests_in_flight(minilm_path, sentences, tmp_path, model_process):
    serve = [sys.executable, "-m", "bentoml", "serve", "service:Gateway"]
    env = {**os.environ, "BENTOFORMERS_MODELS": "minilm", "BENTOFORMERS_MODEL_PROCESS": model_process}
    with running_server(serve, tmp_path / "serve.log", env) as running:
        url, proc = running.url, running.proc
        body = {"inputs": (sentences * 2)[:256], "truncate": True}  # a few hundred ms of model work each
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/embed", json=body, timeout=60) for _ in range(6)]
            # In flight now: all six in the gateway and the first model call started (a fixed sleep is not enough
            # on a busy machine; a request not yet begun when SIGTERM lands is a new one, answered 503).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                page = httpx.get(f"{url}/metrics").text
                if metric_value(page, "bentoformers_requests_in_progress") >= 7 and metric_value(
                        page, 'bentoformers_batch_items_count{model="minilm"}') >= 1:
                    break
                time.sleep(0.05)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        proc.wait(60)
        print(f"\nSIGTERM with 6 requests in flight: {codes}; server gone {time.monotonic() - sent:.1f}s later")
        assert codes == [200] * 6, running.log.read_text()[-3000:]


def test_sigterm_under_steady_load_fails_no_request_and_leaves_no_process(minilm_path, tmp_path):
    """Keep-alive clients under steady load: in flight finish, new ones get 503 + Retry-After + Connection: close
    (not a connection closed under their next request), and every process of the server is gone after."""
    import threading

    import psutil

    serve = [sys.executable, "-m", "bentoml", "serve", "service:Gateway"]
    env = {**os.environ, "BENTOFORMERS_MODELS": "minilm"}
    with running_server(serve, tmp_path / "serve.log", env) as running:
        url, proc = running.url, running.proc
        children = psutil.Process(proc.pid).children(recursive=True)
        results: list[tuple[str, object]] = []
        sigterm = threading.Event()

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:  # one keep-alive connection each
                while True:
                    try:
                        r = http.post("/embed", json={"inputs": [f"steady {i}"] * 16})
                    except httpx.ConnectError:  # refused at connect: nothing was sent
                        results.append(("connect_refused", None))
                        return
                    except httpx.HTTPError as exc:  # sent, then lost: the failure this test is about
                        results.append(("lost", type(exc).__name__))
                        return
                    results.append(("answered", (r.status_code, r.headers.get("retry-after"),
                                                 r.headers.get("connection"), sigterm.is_set())))
                    if r.status_code != 200:
                        return  # told to go elsewhere
                    time.sleep(0.01)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        sigterm.set()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        proc.wait(60)
        gone = time.monotonic() - sent
    answered = [v for kind, v in results if kind == "answered"]
    counts = {}
    for code, *_ in answered:
        counts[code] = counts.get(code, 0) + 1
    lost = [v for kind, v in results if kind == "lost"]
    print(f"\nSIGTERM under steady load (8 keep-alive clients): answers {counts}, lost {len(lost)} {lost}, "
          f"refused at connect {sum(k == 'connect_refused' for k, _ in results)}; server gone {gone:.1f}s later")
    assert not lost
    assert {code for code, *_ in answered} <= {200, 503}
    for code, retry_after, connection, after in answered:
        if code == 503:
            assert after and retry_after and connection == "close"
    time.sleep(1)
    orphans = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not orphans, orphans

"""Metrics and logs on a real `bentoml serve` with two gateway workers and the model service apart.

The values are recorded in three processes (two gateway workers, one model worker); the gateway's
/metrics must show all of them, summed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import sys
import time

import httpx
import pytest
from helpers import ROOT, running_server

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def served(minilm_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("observability") / "serve.log"
    env = {**os.environ, "BENTOML_CONFIG_OPTIONS": "services.bentoformers.workers=2", "BENTOFORMERS_MODELS": "minilm",
           "BENTOFORMERS_MODEL_PROCESS": "separate"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve makes its own, as in production
    serve = [sys.executable, "-m", "bentoml", "serve", "service:Gateway"]
    with running_server(serve, log, env, ready_timeout=120) as running:
        yield running.url, log


@pytest.fixture(scope="module")
def traffic(served):
    """Known traffic: 40 concurrent /embed calls, 3 scans of unknown paths, 1 bad body."""
    url, _ = served
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(
            lambda i: httpx.post(f"{url}/embed", json={"inputs": [f"text number {i}"]}, timeout=30).status_code,
            range(40),
        ))
    assert codes == [200] * 40
    for path in ("/wp-login.php", "/.env", "/admin/secret?token=abc"):
        assert httpx.get(f"{url}{path}").status_code == 404
    bad_body = {"x-request-id": "bad-body-1", "content-type": "application/json"}
    assert httpx.post(f"{url}/v1/embeddings", content=b"{not json", headers=bad_body).status_code == 400
    time.sleep(0.5)
    return httpx.get(f"{url}/metrics").text


def _samples(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric's samples in an exposition text."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_counts_from_every_worker_process_are_summed(traffic):
    requests = _samples(traffic, "bentoformers_requests_total")
    assert requests['{code="200",route="/embed"}'] == 40
    assert requests['{code="404",route="other"}'] == 3
    assert requests['{code="400",route="/v1/embeddings"}'] == 1
    # Recorded in the gateway workers (queue, batches, tokens) ...
    assert sum(_samples(traffic, "bentoformers_batch_items_sum").values()) == 40
    assert _samples(traffic, "bentoformers_queue_wait_seconds_count")['{model="minilm"}'] == 40
    assert _samples(traffic, "bentoformers_tokens_total")['{model="minilm",task="embeddings"}'] >= 40 * 5
    # ... and in the model service process.
    (inference,) = _samples(traffic, "bentoformers_inference_seconds_count").items()
    # The variant that serves is the fastest that holds on this CPU (runtime/selfcheck.py): int8 or fp32.
    assert inference[0] in ('{device="cpu",model="minilm",precision="int8"}',
                            '{device="cpu",model="minilm",precision="fp32"}') and 1 <= inference[1] <= 40
    (load,) = _samples(traffic, "bentoformers_model_load_seconds").values()
    assert 0 < load < 60


def test_no_raw_path_becomes_a_label_of_ours(traffic):
    ours = [line for line in traffic.splitlines() if line.startswith("bentoformers_")]
    assert ours and not any(p in line for line in ours for p in ("wp-login", ".env", "/admin", "abc"))


def test_one_json_access_line_per_request(served, traffic):
    _, log = served
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"time"')]
    embeds = [entry for entry in lines if entry["route"] == "/embed"]
    assert len(embeds) == 40
    assert all(e["status"] == 200 and e["model"] == "minilm" and e["tokens"] >= 5 and e["request_id"] for e in embeds)
    (bad,) = [e for e in lines if e["request_id"] == "bad-body-1"]
    assert bad["status"] == 400 and bad["route"] == "/v1/embeddings"
    assert not any("token=abc" in json.dumps(e) for e in lines)
    # BentoML's own text access line is off on the gateway (its JSON line replaces it).
    assert "/embed" not in "".join(l for l in log.read_text().splitlines() if not l.startswith("{"))


def _queried_metrics() -> set[str]:
    """Metric names in every PromQL expression of the Grafana dashboard and the alert rules."""
    import yaml

    dashboard = json.loads((DEPLOY / "grafana" / "bentoformers.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) > 20
    return {n for e in exprs for n in re.findall(r"\b((?:bentoformers|bentoml)_[a-z_]+|up)\s*[{\[)]", e)}


def test_dashboard_and_alerts_query_only_exported_metrics(traffic):
    from bentoformers.observability import metrics

    exported = {line.split("{")[0].split(" ")[0] for line in traffic.splitlines() if line and line[0] != "#"}
    queried = _queried_metrics()
    # Scraped by Prometheus itself, and recorded only on a GPU host (declared in bentoformers.observability.metrics).
    not_scraped_here = {"up", "bentoformers_gpu_memory_used_bytes"}
    assert metrics.gpu_memory_used_bytes._name == "bentoformers_gpu_memory_used_bytes"
    missing = queried - exported - not_scraped_here
    assert not missing, f"queried but not exported: {sorted(missing)}"
    assert {"bentoformers_inference_seconds_bucket", "bentoformers_rejections_total"} <= queried


def test_a_scan_of_5000_random_paths_leaves_metrics_small(served, traffic):
    """BentoML labels its own HTTP metrics by raw path: 5,000 random URLs made /metrics 20 MB (13 s to scrape)."""
    import asyncio
    import uuid

    url, _ = served
    before = len(httpx.get(f"{url}/metrics").content)

    async def scan():
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=32)) as client:
            gate = asyncio.Semaphore(32)

            async def one(i):
                async with gate:
                    return (await client.get(f"/scan/{uuid.uuid4().hex}/{i}")).status_code

            return await asyncio.gather(*(one(i) for i in range(5000)))

    codes = asyncio.run(scan())
    assert set(codes) == {404}
    started = time.perf_counter()
    page = httpx.get(f"{url}/metrics", timeout=30)
    seconds = time.perf_counter() - started
    print(f"\n/metrics after 5,000 random paths: {len(page.content)} bytes (before: {before}), scraped in {seconds:.3f}s")
    assert page.status_code == 200
    assert len(page.content) <= 1_000_000 and len(page.content) < before + 10_000
    assert "/scan/" not in page.text
    assert _samples(page.text, "bentoformers_requests_total")['{code="404",route="other"}'] == 3 + 5000

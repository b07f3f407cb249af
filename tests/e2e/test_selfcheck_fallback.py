"""A real `bentoml serve` whose int8 variant fails its start-up check: it serves fp32 and says why."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import bentoml
import httpx
import pytest
from helpers import running_server


@pytest.fixture(scope="module")
def strict_model(minilm_path):
    """`strict`: MiniLM's real variants, the int8 one with gates no CPU meets (as a CPU that computes it
    differently would find them)."""
    from bentoformers.runtime import selfcheck

    for precision, folder in minilm_path.items():
        with bentoml.models.create(
            f"strict-{precision}", labels={"model": "strict", "task": "embeddings", "precision": precision}
        ) as stored:
            shutil.copytree(folder, stored.path, dirs_exist_ok=True)
            if precision == "int8":
                check = selfcheck.load(stored.path)
                check["gates"] = {"min_cosine": 1.0, "mean_cosine": 1.0}
                (Path(stored.path) / selfcheck.CHECK_FILE).write_text(json.dumps(check))
    return "strict"


def test_a_variant_below_its_gate_here_is_refused_and_the_next_serves(strict_model, tmp_path):
    env = {**os.environ, "BENTOFORMERS_MODELS": strict_model}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "serve.log"
    with running_server([sys.executable, "-m", "bentoml", "serve", "service:Gateway"], log, env) as server:
        (model,) = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert model["precision"] == "fp32" and model["selfcheck"]["min_cosine"] >= 0.9999
        (refused,) = model["refused_variants"]
        assert refused["precision"] == "int8" and "below its gate on this CPU" in refused["reason"]
        assert "min_cosine" in refused["reason"] and model["cpu"] in refused["reason"]
        assert model["chosen_because"].startswith("the only variant that holds here") and model["tokens_per_second"] > 0
        assert set(model["variant_timings"]) == {"fp32"}
        assert httpx.post(f"{server.url}/embed", json={"inputs": "hello"}).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        assert re.search(r'^bentoformers_selfcheck_refusals_total\{model="strict",precision="int8"\} 1\.0$', metrics, re.M)
    text = log.read_text()
    assert len(re.findall(r"not serving int8: below its gate on this CPU", text)) == 1
    assert re.search(r"serving strict-fp32:\S+ \(embeddings\) on cpu \(fp32, [\w-]+; check set min_cosine", text)
    assert re.search(
        r"the only variant that holds here; its check set runs in fp32 [\d.]+ ms(; \d+ ONNX Runtime thread\(s\) per "
        r"sub-batch \(by threads: 1: [\d.]+ ms, \d+: [\d.]+ ms\))?; [\d.]+ tokens/s\)", text,  # one core: one way
    )

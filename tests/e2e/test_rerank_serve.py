"""The rerank routes on a real `bentoformers serve`: plain HTTP, our client, BentoML's client, Cohere's own SDK,
and eight clients at once."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest


@pytest.fixture(scope="module")
def query_set(sentences):
    documents = [s for s in sentences if len(s.split()) >= 6][:8]
    return " ".join(documents[3].split()[:5]), documents


def test_http_our_client_and_bentomls_agree(server, query_set):
    import bentoml

    from bentoformers import Client

    query, documents = query_set
    ranked = httpx.post(f"{server}/rerank", json={"query": query, "texts": documents, "truncate": True}).json()
    assert sorted(r["index"] for r in ranked) == list(range(8))
    with Client(server) as client:
        results = client.rerank(query, documents, truncate=True)
        assert [(r.index, r.score) for r in results] == [(r["index"], r["score"]) for r in ranked]
        assert [r.index for r in client.rerank(query, documents, top_n=2, truncate=True)] == [
            r["index"] for r in ranked[:2]]
    with bentoml.SyncHTTPClient(server) as client:
        assert client.rerank(query=query, texts=documents, truncate=True) == ranked


def test_cohere_sdk_v1_and_v2_work_unchanged(server, query_set):
    import cohere
    from cohere.core.api_error import ApiError

    query, documents = query_set
    ranked = httpx.post(f"{server}/rerank", json={"query": query, "texts": documents}).json()

    v2 = cohere.ClientV2(api_key="unused", base_url=server).rerank(
        model="rerank", query=query, documents=documents, top_n=3)
    assert [(r.index, r.relevance_score) for r in v2.results] == [(r["index"], r["score"]) for r in ranked[:3]]
    assert v2.meta.api_version.version == "2" and v2.meta.tokens.input_tokens > 8 * 3

    v1 = cohere.Client(api_key="unused", base_url=server)
    answer = v1.rerank(model="rerank", query=query, documents=[{"text": d} for d in documents], top_n=2,
                       return_documents=True)
    assert [(r.index, r.document.text) for r in answer.results] == [(r["index"], documents[r["index"]])
                                                                     for r in ranked[:2]]
    with pytest.raises(ApiError) as caught:
        v1.rerank(model="rerank", query=query, documents=documents, top_n=0)
    assert caught.value.status_code == 422 and caught.value.body["error"]["param"] == "top_n"


def test_eight_clients_at_once_get_what_they_get_alone(server, sentences):
    sets = [(" ".join(sentences[k].split()[:5]), sentences[k : k + 32]) for k in range(0, 96, 4)]

    def scores(query_documents):
        query, documents = query_documents
        r = httpx.post(f"{server}/v2/rerank", json={"query": query, "documents": documents, "truncate": True},
                       timeout=60)
        assert r.status_code == 200, r.text
        return sorted((x["index"], x["relevance_score"]) for x in r.json()["results"])

    alone = [scores(s) for s in sets]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(scores, sets * 2))
    served = next(m for m in httpx.get(f"{server}/v1/models").json()["data"] if m["id"] == "rerank")
    if served["precision"] == "int8":
        assert together == alone * 2
    else:  # fp32 (int8 refused on this CPU): within rounding
        np.testing.assert_allclose(np.array(together), np.array(alone * 2), rtol=1e-5)


def test_bench_rerank_gives_pairs_per_second_beside_the_model_in_process(server, tmp_path):
    import json
    import subprocess
    import sys

    from helpers import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "bentoformers.cli", "bench", "--rerank", server, "-c", "1,2", "-n", "8",
         "--duration", "0.3", "--warmup", "0", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["target"]["route"] == "/rerank" and report["target"]["model"] == "rerank"
    assert [(p["documents"], p["concurrency"]) for p in report["points"]] == [(8, 1), (8, 2)]
    assert all(p["ok"] > 0 and p["errors"] == {} and p["pairs_per_s"] > 0 for p in report["points"])
    assert f"{report['served_precision']}, 8 pairs/call" in report["in_process"]
    assert "pairs/s" in out.stdout and f"of the {report['served_precision']} ceiling" in out.stdout

"""Issue 25's routes on a real `bentoformers serve`: Cohere's own SDK against POST /v2/embed, and POST /embed_sparse
over HTTP, on the served `e5` and `splade`."""

from __future__ import annotations

import httpx
import numpy as np

TEXTS = ["how do cats purr", "A feline rested on a rug."]


def test_cohere_sdk_v2_embed_works_unchanged(server):
    import cohere
    from cohere.core.api_error import ApiError

    co = cohere.ClientV2(api_key="unused", base_url=server, max_retries=0)
    for input_type in ("search_query", "search_document", "classification", "clustering"):
        r = co.embed(model="e5", input_type=input_type, texts=TEXTS, embedding_types=["float", "int8", "ubinary"])
        expected = httpx.post(f"{server}/embed", json={"model": "e5", "inputs": TEXTS, "input_type": input_type,
                                                      "embedding_types": ["float", "int8", "ubinary"]}).json()
        assert r.embeddings.float_ == expected["embeddings"]["float"]
        assert r.embeddings.int8 == expected["embeddings"]["int8"]
        assert r.embeddings.ubinary == expected["embeddings"]["ubinary"]
        assert np.array(r.embeddings.ubinary).shape == (2, 4)  # 32 values, a bit each
    try:
        co.embed(model="e5", input_type="search_query", texts=["word " * 1000], truncate="NONE")
    except ApiError as exc:
        assert exc.status_code == 413 and exc.body["error"]["param"] == "texts.0"
    else:
        raise AssertionError("truncate NONE over the limit was answered")


def test_embed_sparse_over_http(server):
    r = httpx.post(f"{server}/embed_sparse", json={"model": "splade", "inputs": TEXTS, "top_k": 16})
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [len(row) for row in rows] == [16, 16]
    assert all([t["index"] for t in row] == sorted(t["index"] for t in row) for row in rows)

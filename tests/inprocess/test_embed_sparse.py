"""POST /embed_sparse (TEI's shape) on the real app in process, serving `splade` (a tiny masked LM): non-zero
weights by ascending index, `top_k`, a single text, our client, /v1/models, and bad input as a 4xx."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import post

from bentoformers.client import Client

TEXTS = ["how do cats purr", "A feline rested on a rug.", "Dogs bark at night."]


def sparse(client, inputs, **options):
    r = post(client, "/embed_sparse", {"inputs": inputs, "model": "splade", **options})
    assert r.status_code == 200, r.text
    return r.json()


def dense(terms) -> np.ndarray:
    row = np.zeros(30522, dtype=np.float32)
    row[[t["index"] for t in terms]] = [t["value"] for t in terms]
    return row


def test_the_answer_is_teis_shape_and_a_text_alone_equals_it_in_a_batch(client):
    together = sparse(client, TEXTS)
    assert len(together) == len(TEXTS)
    for row in together:
        indices = [t["index"] for t in row]
        assert indices == sorted(set(indices)) and all(t["value"] > 0 for t in row)
        assert set(row[0]) == {"index", "value"}
    assert sparse(client, TEXTS[1]) == [together[1]]  # a single string: still a list of lists
    for i, text in enumerate(TEXTS):
        assert sparse(client, [text]) == [together[i]]


def test_top_k_keeps_the_k_largest_listed_by_index(client):
    (full,) = sparse(client, TEXTS[0])
    (cut,) = sparse(client, TEXTS[0], top_k=32)
    assert len(cut) == 32 and [t["index"] for t in cut] == sorted(t["index"] for t in cut)
    weights = dense(full)
    largest = set(np.lexsort((np.arange(weights.size), -weights))[:32].tolist())
    assert {t["index"] for t in cut} == largest
    assert all(t in full for t in cut)
    (all_terms,) = sparse(client, TEXTS[0], top_k=10**6)
    assert all_terms == full


def test_the_client_and_the_model_list(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["splade"]["task"] == "sparse-embeddings" and models["splade"]["vocab_size"] == 30522
    with Client("http://testserver", http_client=client) as ours:
        rows = ours.embed_sparse(TEXTS, model="splade", top_k=8)
    assert [[(v.index, v.value) for v in row] for row in rows] == [
        [(t["index"], t["value"]) for t in row] for row in sparse(client, TEXTS, top_k=8)
    ]


@pytest.mark.parametrize("body,status,param", [
    ({"inputs": TEXTS, "top_k": 0}, 422, "top_k"),
    ({"inputs": ["word " * 1000]}, 413, "inputs.0"),
    ({"inputs": TEXTS, "prompt_name": "query"}, 400, "prompt_name"),
    ({"inputs": TEXTS, "model": "minilm"}, 400, None),
    ({"inputs": TEXTS, "raw_scores": True}, 422, "raw_scores"),
])
def test_bad_input_is_a_4xx_naming_the_field(client, body, status, param):
    r = post(client, "/embed_sparse", {"model": "splade", **body})
    assert r.status_code == status, r.text
    if param:
        assert r.json()["error"]["param"] == param, r.text
    # A long text is cut with truncate, as on /embed.
    assert len(sparse(client, ["word " * 1000], truncate=True)) == 1


def test_an_answer_over_max_sparse_terms_is_a_413_naming_top_k(client):
    # The tiny random model weighs most of its 30,522 terms in every text: twelve texts pass the 262,144 default.
    texts = [f"{t} {i}" for i in range(4) for t in TEXTS]
    r = post(client, "/embed_sparse", {"model": "splade", "inputs": texts})
    assert r.status_code == 413 and r.json()["error"]["param"] == "top_k", r.text
    assert sum(map(len, sparse(client, texts, top_k=100))) == 1200

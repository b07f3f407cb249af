"""The rerank routes in process, on the trained tiny cross-encoder the tests build (`rerank`): POST /rerank
(TEI's shape), /v1/rerank (Cohere v1, Jina) and /v2/rerank (Cohere v2)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import post

LONG = "word " * 600  # over the model's token limit, under every character limit


@pytest.fixture(scope="module")
def tokenizer(served_build):
    from transformers import AutoTokenizer

    from bentoformers.build.export import resolve_source
    from bentoformers.spec import load_model_list

    (spec,) = [s for s in load_model_list(os.environ["BENTOFORMERS_MODEL_LIST"]) if s.name == "rerank"]
    return AutoTokenizer.from_pretrained(resolve_source(spec.source)[0])


@pytest.fixture(scope="module")
def served(client):
    return next(m for m in client.get("/v1/models").json()["data"] if m["id"] == "rerank")


def ok(client, path, body):
    r = post(client, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_scores_equal_the_pytorch_cross_encoder(client, served, checkpoints):
    """The relevance scores of PyTorch's fp32 cross-encoder on the same checkpoint, as sentence-transformers'
    CrossEncoder computes them (the sigmoid of the one logit of tokenizer(query, document))."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bentoformers.runtime.fidelity import rerank_sets

    tokenizer = AutoTokenizer.from_pretrained(checkpoints / "rerank")
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints / "rerank").eval()
    for query, documents in rerank_sets()[:4]:
        ranked = ok(client, "/rerank", {"query": query, "texts": documents, "truncate": True})
        ours = np.array([r["score"] for r in sorted(ranked, key=lambda r: r["index"])])
        with torch.inference_mode():
            enc = tokenizer([query] * len(documents), documents, padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            theirs = torch.sigmoid(model(**enc).logits[:, 0]).numpy()
        # fp32 within rounding; int8 within its gate (tasks.py: max_score_diff 0.1).
        np.testing.assert_allclose(ours, theirs, atol=1e-5 if served["precision"] == "fp32" else 0.1)


def test_tei_shape(client):
    documents = ["Paris is the capital of France.", "The cat sat on the mat.", "France borders Spain."]
    ranked = ok(client, "/rerank", {"query": "capital of France", "texts": documents})
    assert sorted(r["index"] for r in ranked) == [0, 1, 2]
    assert all(set(r) == {"index", "score"} and 0 < r["score"] < 1 for r in ranked)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)

    with_text = ok(client, "/rerank", {"query": "capital of France", "texts": documents, "return_text": True})
    assert with_text == [r | {"text": documents[r["index"]]} for r in ranked]

    raw = ok(client, "/rerank", {"query": "capital of France", "texts": documents, "raw_scores": True})
    assert [r["index"] for r in raw] == [r["index"] for r in ranked]
    for logit, relevance in zip(raw, ranked):
        assert relevance["score"] == pytest.approx(1 / (1 + np.exp(-logit["score"])), rel=1e-12)


def test_cohere_and_jina_shapes(client, tokenizer):
    query, documents = "capital of France", ["Paris is the capital of France.", "The cat sat on the mat."]
    tokens = sum(len(tokenizer(query, d)["input_ids"]) for d in documents)
    scores = {r["index"]: r["score"] for r in ok(client, "/rerank", {"query": query, "texts": documents})}

    v2 = ok(client, "/v2/rerank", {"model": "rerank", "query": query, "documents": documents})
    assert set(v2) == {"id", "model", "results", "meta", "usage"} and v2["id"] and v2["model"] == "rerank"
    assert v2["results"] == [{"index": i, "relevance_score": s} for i, s in sorted(scores.items(), key=lambda x: -x[1])]
    assert v2["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                          "tokens": {"input_tokens": tokens}}
    assert v2["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    # Jina's documents as objects; /v1/rerank returns the documents unless told not to (Jina's default).
    v1 = ok(client, "/v1/rerank", {"query": query, "documents": [{"text": d} for d in documents], "top_n": 1})
    assert v1["results"] == [v2["results"][0] | {"document": {"text": documents[v2["results"][0]["index"]]}}]
    assert v1["meta"]["api_version"] == {"version": "1"} and v1["usage"] == v2["usage"]
    assert ok(client, "/v1/rerank", {"query": query, "documents": documents, "return_documents": False})[
        "results"] == v2["results"]
    assert ok(client, "/v2/rerank", {"query": query, "documents": documents, "return_documents": True})[
        "results"] == [r | {"document": {"text": documents[r["index"]]}} for r in v2["results"]]
    # top_n past the documents: all of them.
    assert ok(client, "/v2/rerank", {"query": query, "documents": documents, "top_n": 50})["results"] == v2["results"]


def test_a_documents_score_does_not_depend_on_what_else_was_sent(client, served, sentences):
    query, documents = "the history of the city", sentences[:32]
    together = ok(client, "/rerank", {"query": query, "texts": documents, "raw_scores": True, "truncate": True})
    together = np.array([r["score"] for r in sorted(together, key=lambda r: r["index"])])
    alone = np.array([ok(client, "/rerank", {"query": query, "texts": [d], "raw_scores": True, "truncate": True})[0]
                      ["score"] for d in documents])
    if served["precision"] == "int8":  # exact: int8 graphs quantize each token's activations on their own
        assert np.array_equal(alone, together)
    else:  # fp32 (int8 refused on this CPU): within rounding
        np.testing.assert_allclose(alone, together, rtol=1e-5)
    v2 = ok(client, "/v2/rerank", {"query": query, "documents": documents, "truncate": True})["results"]
    relevance = np.array([r["relevance_score"] for r in sorted(v2, key=lambda r: r["index"])])
    assert np.array_equal(relevance, 1 / (1 + np.exp(-together.astype(np.float32).astype(np.float64))))


def test_usage_counts_the_pairs_tokens_and_truncation_cuts_at_the_limit(client, served, tokenizer):
    query, documents = "a short query", ["first document", "a second, longer document about trains"]
    body = ok(client, "/v2/rerank", {"query": query, "documents": documents})
    assert body["usage"]["total_tokens"] == sum(len(tokenizer(query, d)["input_ids"]) for d in documents)
    cut = ok(client, "/v2/rerank", {"query": query, "documents": [LONG], "truncate": True})
    assert cut["usage"]["total_tokens"] == served["max_input_tokens"]


def test_max_tokens_per_doc_cuts_each_document(client, tokenizer):
    query, document = "trains", "The night train to Vienna leaves at ten and arrives in the morning " * 20
    offsets = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    first_20 = document[: offsets[19][1]]
    body = ok(client, "/v2/rerank", {"query": query, "documents": [document], "max_tokens_per_doc": 20})
    assert body["usage"]["total_tokens"] == len(tokenizer(query, first_20)["input_ids"])
    alone = ok(client, "/v2/rerank", {"query": query, "documents": [first_20]})
    assert body["results"] == alone["results"]


BAD_REQUESTS = [
    # (route, body, status, error type, param)
    ("/rerank", {"query": "", "texts": ["a"]}, 422, "validation_error", "query"),
    ("/rerank", {"query": " \u200b ", "texts": ["a"]}, 422, "validation_error", "query"),
    ("/rerank", {"query": "q", "texts": []}, 422, "validation_error", "texts"),
    ("/rerank", {"query": "q", "texts": ["a", "  "]}, 422, "validation_error", "texts.1"),
    ("/rerank", {"query": "q", "texts": ["a", LONG]}, 413, "request_too_large", "texts.1"),
    ("/rerank", {"query": LONG, "texts": ["a"]}, 413, "request_too_large", "query"),
    ("/rerank", {"query": "q", "texts": ["a"] * 257}, 413, "request_too_large", "texts"),
    ("/rerank", {"query": "q", "texts": "a"}, 422, "validation_error", "texts"),
    ("/rerank", {"query": ["q"], "texts": ["a"]}, 422, "validation_error", "query"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": 1}, 422, "validation_error", "raw_scores"),
    ("/rerank", {"query": "q", "texts": ["a"], "top_n": 1}, 422, "validation_error", "top_n"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, 400, "invalid_request_error",
     "truncation_direction"),
    ("/rerank", {"query": "q", "texts": ["a"], "model": "minilm"}, 400, "invalid_request_error", "model"),
    ("/rerank", {"query": "q", "texts": ["a"], "model": "nope"}, 404, "not_found_error", "model"),
    ("/v1/rerank", {"query": "", "documents": ["a"]}, 422, "validation_error", "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, 422, "validation_error", "documents"),
    ("/v1/rerank", {"query": "q", "documents": [{"image": "x.png"}]}, 422, "validation_error", "documents.0"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": ""}]}, 422, "validation_error", "documents.0"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": ["title"]}, 400, "invalid_request_error",
     "rank_fields"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "max_chunks_per_doc": 10}, 400, "invalid_request_error",
     "max_chunks_per_doc"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "validation_error", "top_n"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": "1"}, 422, "validation_error", "top_n"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "return_documents": "yes"}, 422, "validation_error",
     "return_documents"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, 422, "validation_error",
     "max_tokens_per_doc"),
    ("/v2/rerank", {"query": "q", "documents": ["a"] * 257}, 413, "request_too_large", "documents"),
    ("/v2/rerank", {"query": "q", "documents": [LONG]}, 413, "request_too_large", "documents.0"),
    ("/v2/rerank", {"query": "q", "documents": "a"}, 422, "validation_error", "documents"),
    ("/v2/rerank", {"documents": ["a"]}, 422, "validation_error", "query"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "relevant_spans": {"mode": "enabled"}}, 400,
     "invalid_request_error", "relevant_spans"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "model": "sentiment"}, 400, "invalid_request_error", "model"),
    ("/v2/rerank", b"{not json", 400, "invalid_request_error", None),
]


@pytest.mark.parametrize("route,body,status,kind,param", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_in_the_one_error_body(client, route, body, status, kind, param):
    r = post(client, route, body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    error = r.json()["error"]
    assert error["type"] == kind and error["param"] == param and error["message"], error

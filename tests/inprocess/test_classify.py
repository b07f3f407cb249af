"""POST /classify in process, on the tiny classifier the tests build (`sentiment`), next to MiniLM."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import post


def classify(client, body):
    r = post(client, "/classify", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_label_with_softmax_scores_sorted_best_first(client):
    body = classify(client, {"inputs": ["I loved this film.", "Dreadful service, never again."], "model": "sentiment"})
    assert body["model"] == "sentiment"
    assert len(body["results"]) == 2
    for result in body["results"]:
        assert sorted(r["label"] for r in result) == ["negative", "positive"]
        scores = [r["score"] for r in result]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)
    # [CLS] + words + [SEP], counted by the real tokenizer
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 10


def test_top_k_and_the_default_model_of_the_task(client):
    # No `model`: the first served classification model answers, though MiniLM is the first model overall.
    body = classify(client, {"inputs": "fine", "top_k": 1})
    assert body["model"] == "sentiment" and len(body["results"][0]) == 1
    everything = classify(client, {"inputs": "fine", "top_k": None})["results"][0]
    assert body["results"][0][0] == everything[0]
    assert classify(client, {"inputs": "fine", "top_k": 5})["results"][0] == everything


def test_scores_match_the_pytorch_classifier(client, served_build):
    import os

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bentoformers.build.export import resolve_source
    from bentoformers.spec import load_model_list

    (spec,) = [s for s in load_model_list(os.environ["BENTOFORMERS_MODEL_LIST"]) if s.name == "sentiment"]
    folder, _ = resolve_source(spec.source)
    texts = ["What a wonderful day.", "The train was late again.", "ok"]
    with torch.inference_mode():
        enc = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
        expected = AutoModelForSequenceClassification.from_pretrained(folder)(**enc).logits.softmax(-1).numpy()
    served = classify(client, {"inputs": texts})["results"]
    got = np.array([[next(r["score"] for r in result if r["label"] == label) for label in ("negative", "positive")]
                    for result in served])
    # The served variant is int8 (CPU); its gate bounds the probability difference at 0.1.
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, atol=0.1)


def test_a_texts_scores_do_not_depend_on_the_batch_it_is_sent_in(client, sentences):
    texts = sentences[:24]
    alone = [classify(client, {"inputs": t, "truncate": True})["results"][0] for t in texts]
    together = classify(client, {"inputs": texts, "truncate": True})["results"]
    assert together == alone

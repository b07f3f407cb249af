"""Zero-shot classification (`/classify` with `candidate_labels`) on the served NLI model, against Transformers'
own zero-shot pipeline on the same checkpoint (the model is served in fp32 here: tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import post
from starlette.testclient import TestClient

TEXTS = [
    "I ordered a pair of running shoes three weeks ago and the tracking page still says label created.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The train to Lisbon leaves on Friday morning.",
]
LABELS = ["shoes", "water", "train", "politics"]


@pytest.fixture(scope="module")
def pipeline(checkpoints):
    from transformers import pipeline

    return pipeline("zero-shot-classification", model=str(checkpoints / "nli"), device="cpu")


def classify(client, **body):
    return post(client, "/classify", {"model": "nli", **body})


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("template", [None, "This text is about {}."])
def test_scores_equal_the_transformers_pipeline(client, pipeline, multi_label, template):
    extra = {"hypothesis_template": template} if template else {}
    r = classify(client, inputs=TEXTS, candidate_labels=LABELS, multi_label=multi_label, **extra)
    assert r.status_code == 200, r.text
    theirs = pipeline(TEXTS, candidate_labels=LABELS, multi_label=multi_label, **extra)
    for ours, reference in zip(r.json()["results"], theirs):
        assert [x["label"] for x in ours] == reference["labels"]
        np.testing.assert_allclose([x["score"] for x in ours], reference["scores"], atol=1e-5)


def test_top_k_cuts_and_a_lone_label_is_scored_against_contradiction(client, pipeline):
    full = classify(client, inputs=TEXTS, candidate_labels=LABELS).json()["results"]
    top = classify(client, inputs=TEXTS, candidate_labels=LABELS, top_k=1).json()["results"]
    assert top == [row[:1] for row in full]
    # One label is scored on its own, entailment against contradiction, as in the pipeline.
    alone = classify(client, inputs=TEXTS[1], candidate_labels=["water"]).json()["results"][0]
    reference = pipeline(TEXTS[1], candidate_labels=["water"])
    assert [x["label"] for x in alone] == ["water"]
    np.testing.assert_allclose(alone[0]["score"], reference["scores"][0], atol=1e-5)


def test_a_text_scores_the_same_alone_and_beside_others(client):
    alone = classify(client, inputs=TEXTS[2], candidate_labels=LABELS).json()["results"][0]
    together = classify(client, inputs=TEXTS, candidate_labels=LABELS).json()["results"][2]
    assert [x["label"] for x in alone] == [x["label"] for x in together]
    np.testing.assert_allclose([x["score"] for x in alone], [x["score"] for x in together], atol=1e-6)


def test_usage_counts_every_premise_hypothesis_pair(client, checkpoints):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints / "nli")
    r = classify(client, inputs=TEXTS[:2], candidate_labels=LABELS[:2])
    expected = sum(len(tokenizer(t, f"This example is {label}.")["input_ids"]) for t in TEXTS[:2] for label in LABELS[:2])
    assert r.json()["usage"]["prompt_tokens"] == expected


def test_a_long_premise_is_truncated_when_asked_and_named_when_not(client):
    long_text = "The train to Lisbon leaves on Friday morning. " * 40
    refused = classify(client, inputs=["short one", long_text], candidate_labels=LABELS)
    assert refused.status_code == 413 and refused.json()["error"]["param"] == "inputs.1"
    r = classify(client, inputs=["short one", long_text], candidate_labels=LABELS, truncate=True)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"candidate_labels": []}, 422, "candidate_labels"),
        ({"candidate_labels": ["a", ""]}, 422, "candidate_labels.1"),
        ({"candidate_labels": ["a", "a"]}, 422, "candidate_labels"),
        ({"candidate_labels": ["a", 3]}, 422, "candidate_labels.1"),
        ({"candidate_labels": "a"}, 422, "candidate_labels"),
        ({"candidate_labels": [f"l{i}" for i in range(65)]}, 422, "candidate_labels"),
        ({"candidate_labels": ["a"], "hypothesis_template": "no slot"}, 422, "hypothesis_template"),
        ({"candidate_labels": ["a"], "hypothesis_template": "{} and {}"}, 422, "hypothesis_template"),
        ({"candidate_labels": ["a"], "multi_label": "yes"}, 422, "multi_label"),
        ({"candidate_labels": ["a"], "model": "sentiment"}, 400, "candidate_labels"),
        ({"candidate_labels": ["a", "b"], "inputs": ["x"] * 129}, 413, "inputs"),
    ],
)
def test_bad_zero_shot_requests_get_the_error_body(client, body, status, param):
    r = classify(client, **{"inputs": "a text", **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_the_client_splits_a_zero_shot_list_by_pairs_and_joins_it(app):
    from bentoformers.client import Client

    many = [f"{TEXTS[i % 3]} ({i})" for i in range(70)]  # 70 texts x 4 labels: 280 pairs, over the 256 a call takes
    with TestClient(app) as http, Client("http://testserver", http_client=http) as client:
        result = client.classify(many, candidate_labels=LABELS, model="nli")
        one = client.classify(many[69], candidate_labels=LABELS, model="nli")
    assert len(result.results) == 70
    assert [x.label for x in result.results[69]] == [x.label for x in one.results[0]]
    np.testing.assert_allclose([x.score for x in result.results[69]], [x.score for x in one.results[0]], atol=1e-6)

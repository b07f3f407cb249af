"""POST /ner in process, on the trained tiny token classifier the tests build (`ner`: dates, places, numbers).

The served app serves `ner` in int8 (CPU). Transformers' pipeline is matched on fp32: through a second app of
the same handler, tokenizer and endpoint over the built fp32 variant, its graph run in this process instead of
through the model service. The int8 answers are checked for what they must keep (offsets, windows, batches).
"""

from __future__ import annotations

import math
import re

import pytest
from helpers import post
from starlette.testclient import TestClient

from bentoformers.runtime.entities import STRATEGIES
from bentoformers.tools.tiny_models import entity_of

# Sentences with the dates, places and numbers the tiny model was trained to tag, words it splits into pieces
# (2024, tuesdays: it tags only some of their pieces, which the strategies treat apart) and a character it
# does not know (a snowman).
TEXTS = [
    "On Monday, 3 trains left Paris for Berlin and Tokyo in March.",
    "The 2024 games end on 11 August, in Paris.",
    "Meet me in Lisbon on Tuesdays at 10:30, by the café ☃ near the river.",
    "We fly to japan in december, then rome and london before 2025 ends.",
    "nothing to see here at all",
]


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def checkpoint(served_build):
    """The fp32 PyTorch checkpoint the build exported."""
    import os

    from bentoformers.build.export import resolve_source
    from bentoformers.spec import load_model_list

    (spec,) = [s for s in load_model_list(os.environ["BENTOFORMERS_MODEL_LIST"]) if s.name == "ner"]
    return resolve_source(spec.source)[0]


@pytest.fixture(scope="module")
def fp32_client(served_build):
    """The /ner route over the built fp32 variant: the app's own handler, endpoint and tokenizer."""
    import bentoml

    from bentoformers.api.app import create_app
    from bentoformers.gateway.chooser import ModelChooser
    from bentoformers.gateway.endpoint import EncoderEndpoint
    from bentoformers.runtime.encoder import OnnxEncoder
    from bentoformers.settings import Settings

    folder = bentoml.models.get(served_build["ner"]["fp32"].tag).path
    encoder = OnnxEncoder(folder, threads=1)

    async def describe():
        return {"precision": "fp32", "device": "cpu"}

    async def call(ids):
        return encoder.classify(ids)

    settings = Settings()
    app = create_app()
    app.state.chooser = ModelChooser(settings, [EncoderEndpoint(settings, folder, describe=describe, call=call)])
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from bentoformers.runtime.tokenizer import TextTokenizer

    return TextTokenizer(checkpoint, 128)


@pytest.fixture(scope="module")
def reference(checkpoint):
    import warnings

    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pipeline's notes on fast tokenizers
        return pipeline("token-classification", model=str(checkpoint), device="cpu")


def ner(client, body):
    r = post(client, "/ner", body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_same_entities(ours: list[dict], theirs: list[dict]) -> None:
    theirs = [{k: float(v) if k == "score" else int(v) if k in ("index", "start", "end") else v for k, v in e.items()}
              for e in theirs]
    assert [{k: v for k, v in e.items() if k != "score"} for e in ours] == \
        [{k: v for k, v in e.items() if k != "score"} for e in theirs]
    assert [e["score"] for e in ours] == pytest.approx([e["score"] for e in theirs], abs=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp32_answers_are_the_pipelines(fp32_client, reference, sentences, strategy):
    texts = TEXTS + sentences[:12]
    body = ner(fp32_client, {"inputs": texts, "aggregation_strategy": strategy})
    assert body["windows"] == [1] * len(texts)
    expected = reference(texts, aggregation_strategy=strategy)
    for ours, theirs in zip(body["results"], expected, strict=True):
        assert_same_entities(ours, theirs)
    assert sum(map(len, body["results"])) >= 10  # the comparison is not of empty lists
    # Every label, O too, as the pipeline gives them with ignore_labels=[].
    everything = ner(fp32_client, {"inputs": TEXTS[0], "aggregation_strategy": strategy, "ignore_labels": []})
    assert_same_entities(everything["results"][0], reference(TEXTS[0], aggregation_strategy=strategy, ignore_labels=[]))


def test_the_served_model_finds_the_entities_and_offsets_slice_the_text(client):
    body = ner(client, {"inputs": TEXTS[0]})
    assert body["model"] == "ner" and body["windows"] == [1]
    found = [(TEXTS[0][e["start"]:e["end"]], e["entity_group"]) for e in body["results"][0]]
    assert found == [("Monday", "DATE"), ("3", "NUM"), ("Paris", "LOC"), ("Berlin", "LOC"), ("Tokyo", "LOC"),
                     ("March", "DATE")]
    for strategy in STRATEGIES:
        for text, entities in zip(TEXTS, ner(client, {"inputs": TEXTS, "aggregation_strategy": strategy})["results"]):
            for e in entities:
                piece = text[e["start"]:e["end"]]
                if strategy == "none":
                    assert e["word"] in (piece.lower(), "##" + piece.lower(), piece)  # a piece, or an unknown word
                elif "☃" not in piece:  # the uncased vocabulary joined back: the text itself
                    # (simple may start a group inside a word, where the pipeline keeps the piece's "##")
                    assert e["word"] in (piece.lower(), "##" + piece.lower() if strategy == "simple" else None)
                assert 0 < e["score"] <= 1


def test_a_text_over_the_token_limit_is_read_in_windows_with_offsets_into_it(client, tokenizer, sentences):
    # About four windows of the model's 128 tokens, an entity in each, Monday near the very end.
    filler = " ".join(s for s in sentences if not any(entity_of(w) for w in re.findall(r"\w+", s)))
    words = filler.split()[:360]
    for at, word in ((5, "Lisbon"), (120, "Tokyo"), (240, "Berlin")):
        words.insert(at, word)
    text = " ".join(words) + " and we meet on Monday"
    body = ner(client, {"inputs": [text, TEXTS[0]]})
    tokens = len(tokenizer.encode_spans([text])[0].ids)
    window = 126  # 128, less [CLS] and [SEP]; consecutive windows share a quarter
    assert body["windows"] == [1 + math.ceil((tokens - 2 - window) / (window - window // 4)), 1]
    assert body["windows"][0] >= 4
    found = [(text[e["start"]:e["end"]], e["entity_group"], e["start"]) for e in body["results"][0]]
    assert [f[:2] for f in found] == [("Lisbon", "LOC"), ("Tokyo", "LOC"), ("Berlin", "LOC"), ("Monday", "DATE")]
    assert found[-1][2] == len(text) - len("Monday")
    # The short text beside it is read as it is alone.
    assert body["results"][1] == ner(client, {"inputs": TEXTS[0]})["results"][0]
    # Every strategy reads it in the same windows; tokens keep their place in the whole text.
    tokens_found = ner(client, {"inputs": text, "aggregation_strategy": "none"})["results"][0]
    assert [text[e["start"]:e["end"]] for e in tokens_found] == ["Lisbon", "Tokyo", "Berlin", "Monday"]
    assert tokens_found[-1]["index"] == tokens - 2  # the last token before [SEP]


def test_a_texts_entities_do_not_depend_on_the_batch_it_is_sent_in(client, sentences):
    texts = TEXTS + sentences[:20]
    for strategy in ("none", "average"):
        alone = [ner(client, {"inputs": t, "aggregation_strategy": strategy})["results"][0] for t in texts]
        together = ner(client, {"inputs": texts, "aggregation_strategy": strategy})["results"]
        assert together == alone


def test_usage_counts_every_window_token(client):
    body = ner(client, {"inputs": ["Lisbon", "in May"]})
    assert body["usage"] == {"prompt_tokens": 3 + 4, "total_tokens": 7}


BAD_REQUESTS = [
    # (body, status, error type, param)
    ({"inputs": []}, 422, "validation_error", "inputs"),
    ({"inputs": ["ok", " \u200b "]}, 422, "validation_error", "inputs.1"),
    ({"inputs": "ok", "aggregation_strategy": "longest"}, 422, "validation_error", "aggregation_strategy"),
    ({"inputs": "ok", "ignore_labels": "O"}, 422, "validation_error", "ignore_labels"),
    ({"inputs": "ok", "truncate": True}, 422, "validation_error", "truncate"),
    ({"inputs": 3}, 422, "validation_error", "inputs"),
    ({"inputs": "ok", "model": "sentiment"}, 400, "invalid_request_error", "model"),
    ({"inputs": "ok", "model": "nope"}, 404, "not_found_error", "model"),
    ({"inputs": ["x" * 100_001]}, 413, "request_too_large", "inputs.0"),
    # Three texts of 10,000 tokens: over 300 windows, over the 256 sequences a request may make.
    ({"inputs": ["word " * 10_000] * 3}, 413, "request_too_large", "inputs"),
]


@pytest.mark.parametrize(("body", "status", "kind", "param"), BAD_REQUESTS)
def test_bad_requests_get_the_one_error_body(client, body, status, kind, param):
    r = post(client, "/ner", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind and r.json()["error"]["param"] == param
    if param == "inputs" and status == 413:
        assert "windows" in r.json()["error"]["message"] and "256" in r.json()["error"]["message"]

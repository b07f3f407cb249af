"""Embedding options on the real app in process: prompts (prompt_name, prompt, input_type), Matryoshka
dimensions, truncation on either side, and POST /tokenize; on `e5` (a tiny encoder with e5's query/passage
prompts and Matryoshka sizes 32, 16, 8) and MiniLM (neither)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from helpers import E5_PROMPTS, post
from starlette.testclient import TestClient

from bentoformers.client import AsyncClient, Client

WORDS = "one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def e5_tokenizer(served_build):
    import bentoml

    from bentoformers.runtime.tokenizer import TextTokenizer

    return TextTokenizer(bentoml.models.get(served_build["e5"]["fp32"].tag).path, 128)


def embed(client, inputs, **options):
    r = post(client, "/embed", {"inputs": inputs, "model": "e5", **options})
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"]), r.json()["usage"]["prompt_tokens"]


def openai(client, inputs, **options):
    r = post(client, "/v1/embeddings", {"input": inputs, "model": "e5", **options})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]]), r.json()["usage"]["prompt_tokens"]


TEXTS = ["how do cats purr", "A feline rested on a rug."]


def test_a_named_prompt_is_the_text_with_the_prompt_before_it(client, e5_tokenizer):
    for name, prefix in E5_PROMPTS.items():
        prompted, tokens = embed(client, TEXTS, prompt_name=name)
        by_hand, by_hand_tokens = embed(client, [prefix + t for t in TEXTS])
        np.testing.assert_allclose(prompted, by_hand, atol=1e-6)
        # The prompt's tokens count, as sentence-transformers and TEI count them.
        assert tokens == by_hand_tokens == sum(len(e5_tokenizer.ids(prefix + t)) for t in TEXTS)
    plain, plain_tokens = embed(client, TEXTS)
    assert plain_tokens == sum(len(e5_tokenizer.ids(t)) for t in TEXTS) < tokens
    assert not np.allclose(plain, prompted, atol=1e-3)
    # A raw prompt is the same as the named one; "" is no prompt (e5 has no default prompt either).
    np.testing.assert_allclose(embed(client, TEXTS, prompt="query: ")[0], embed(client, TEXTS, prompt_name="query")[0],
                               atol=1e-6)
    np.testing.assert_allclose(embed(client, TEXTS, prompt="")[0], plain, atol=1e-6)


@pytest.mark.parametrize("input_type,prompt_name", [
    ("query", "query"), ("search_query", "query"), ("passage", "passage"), ("document", "passage"),
    ("search_document", "passage"),
])
def test_openai_input_type_picks_the_models_prompt(client, input_type, prompt_name):
    by_type, tokens = openai(client, TEXTS, input_type=input_type)
    by_name, name_tokens = openai(client, TEXTS, prompt_name=prompt_name)
    np.testing.assert_allclose(by_type, by_name, atol=1e-6)
    assert tokens == name_tokens
    np.testing.assert_allclose(by_name, embed(client, TEXTS, prompt_name=prompt_name)[0], atol=1e-6)


def test_input_type_on_a_model_without_prompts_embeds_the_text_as_it_is(client):
    def vectors(**options):
        r = post(client, "/v1/embeddings", {"input": TEXTS, "model": "minilm", **options})
        assert r.status_code == 200, r.text
        return np.array([d["embedding"] for d in r.json()["data"]])

    np.testing.assert_allclose(vectors(input_type="query"), vectors(), atol=1e-6)
    np.testing.assert_allclose(vectors(input_type="document"), vectors(), atol=1e-6)


def test_dimensions_cut_the_vector_and_normalise_it_again(client):
    raw, _ = embed(client, TEXTS, normalize=False)
    full, _ = embed(client, TEXTS)
    assert full.shape == (2, 32)
    np.testing.assert_allclose(full, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    for size in (16, 8):
        cut, _ = embed(client, TEXTS, dimensions=size)
        expected = raw[:, :size] / np.linalg.norm(raw[:, :size], axis=1, keepdims=True)
        np.testing.assert_allclose(cut, expected, atol=1e-6)
        np.testing.assert_allclose(openai(client, TEXTS, dimensions=size)[0], expected, atol=1e-6)
        # normalize: false asks for the raw values: the first ones, as they are.
        np.testing.assert_allclose(embed(client, TEXTS, dimensions=size, normalize=False)[0], raw[:, :size], atol=1e-6)
    # The full size is always there, on any model.
    np.testing.assert_allclose(embed(client, TEXTS, dimensions=32)[0], full, atol=1e-6)
    assert len(post(client, "/embed", {"inputs": "x", "dimensions": 384}).json()["embeddings"][0]) == 384
    # Prompt and dimensions together: the prompted vector, cut.
    prompted_raw, _ = embed(client, TEXTS, prompt_name="query", normalize=False)
    np.testing.assert_allclose(
        openai(client, TEXTS, input_type="query", dimensions=8, encoding_format="float")[0],
        prompted_raw[:, :8] / np.linalg.norm(prompted_raw[:, :8], axis=1, keepdims=True), atol=1e-6,
    )


def test_left_truncation_keeps_the_end_of_the_text(client, e5_tokenizer):
    # 1,000 one-token words, ~5,000 characters: past what truncation tokenizes (16 characters per token of the
    # limit), so the end must survive the cut before tokenizing too.
    words = [WORDS[i % 10] for i in range(999)] + ["last"]
    text = " ".join(words)
    assert len(text) > 128 * 16
    left, tokens = embed(client, [text], truncate=True, truncation_direction="left")
    assert tokens == 128
    np.testing.assert_allclose(left, embed(client, [" ".join(words[-126:])])[0], atol=1e-6)
    # TEI's spelling is taken too, and right (the default) keeps the start.
    np.testing.assert_allclose(embed(client, [text], truncate=True, truncation_direction="Left")[0], left, atol=1e-6)
    right, _ = embed(client, [text], truncate=True)
    np.testing.assert_allclose(right, embed(client, [" ".join(words[:126])])[0], atol=1e-6)
    np.testing.assert_allclose(embed(client, [text], truncate=True, truncation_direction="Right")[0], right, atol=1e-6)
    # With a prompt, left truncation keeps the prompt and cuts the text's start.
    prompted, tokens = openai(client, [text], truncate=True, truncation_direction="left", input_type="query")
    assert tokens == 128
    np.testing.assert_allclose(prompted, embed(client, ["query: " + " ".join(words[-124:])])[0], atol=1e-6)
    expected = e5_tokenizer.ids("query: " + " ".join(words[-124:]))
    assert e5_tokenizer.encode([text], True, "left", "query: ") == [expected]


def test_tokenize_gives_ids_and_offsets_into_the_callers_text(client, e5_tokenizer):
    texts = ["Héllo, wörld!", "cats purr"]
    r = post(client, "/tokenize", {"inputs": texts, "model": "e5"})
    assert r.status_code == 200, r.text
    for text, tokens in zip(texts, r.json(), strict=True):
        assert [t["id"] for t in tokens] == e5_tokenizer.ids(text)
        assert [t["special"] for t in tokens] == [True] + [False] * (len(tokens) - 2) + [True]
        assert [(t["text"], t["start"]) for t in (tokens[0], tokens[-1])] == [("[CLS]", None), ("[SEP]", None)]
        for t in tokens[1:-1]:
            assert text[t["start"] : t["stop"]] == t["text"] and not t["prompt"]
    assert [t["text"] for t in r.json()[0][1:-1]] == ["Héllo", ",", "wörld", "!"]
    # A single text: one list, as TEI answers; without special tokens, only the text's.
    single = post(client, "/tokenize", {"inputs": "cats purr", "model": "e5", "add_special_tokens": False}).json()
    assert single == [r.json()[1][1:-1]]


def test_tokenize_marks_the_prompts_tokens_and_offsets_stay_in_the_text(client, e5_tokenizer):
    text = "cats purr"
    (tokens,) = post(client, "/tokenize", {"inputs": text, "model": "e5", "prompt_name": "query"}).json()
    assert [t["id"] for t in tokens] == e5_tokenizer.ids("query: " + text)
    assert [(t["text"], t["prompt"], t["start"]) for t in tokens[:3]] == [
        ("[CLS]", False, None), ("query", True, None), (":", True, None)]
    assert [(t["text"], t["start"], t["stop"]) for t in tokens[3:-1]] == [("cats", 0, 4), ("pu", 5, 7), ("rr", 7, 9)]
    # Its token count is what /embed charges for the same request.
    assert len(tokens) == embed(client, [text], prompt_name="query")[1]
    (raw,) = post(client, "/tokenize", {"inputs": text, "model": "e5", "prompt": "query: "}).json()
    assert raw == tokens


@pytest.mark.parametrize("model", ["minilm", "sentiment", "gpt2"])
def test_tokenize_serves_every_task(client, model):
    text = "The cat sat on the mat. Naïve café."
    r = post(client, "/tokenize", {"inputs": [text], "model": model})
    assert r.status_code == 200, r.text
    (tokens,) = r.json()
    words = [t for t in tokens if not t["special"]]
    starts = [t["start"] for t in words]
    assert starts == sorted(starts) and words[0]["start"] == 0 and words[-1]["stop"] == len(text)
    assert all(t["text"] == text[t["start"] : t["stop"]] and t["text"] for t in words)


def test_tokenize_without_a_model_uses_the_default_model(client):
    r = post(client, "/tokenize", {"inputs": "cats purr"})
    # Each word piece's text is its surface in the input: "##rr" is "rr".
    assert r.status_code == 200 and [t["text"] for t in r.json()[0]] == ["[CLS]", "cats", "pu", "rr", "[SEP]"]


def test_models_say_what_each_embedding_model_supports(client):
    entries = {e["id"]: e for e in client.get("/v1/models").json()["data"]}
    e5, minilm = entries["e5"], entries["minilm"]
    assert (e5["dimensions"], e5["matryoshka_dimensions"]) == (32, [32, 16, 8])
    assert e5["prompts"] == E5_PROMPTS and e5["default_prompt_name"] is None
    assert (minilm["matryoshka_dimensions"], minilm["prompts"], minilm["default_prompt_name"]) == ([], {}, None)


BAD = [
    # (route, body, status, error type, param, words the message must hold)
    ("/embed", {"prompt_name": "nope"}, 400, "invalid_request_error", "prompt_name", ["query, passage"]),
    ("/embed", {"prompt_name": "query", "prompt": "q: "}, 400, "invalid_request_error", "prompt", ["not both"]),
    ("/embed", {"prompt_name": ""}, 400, "invalid_request_error", "prompt_name", ["query, passage"]),
    ("/embed", {"prompt_name": 3}, 422, "validation_error", "prompt_name", []),
    ("/embed", {"prompt": ["q: "]}, 422, "validation_error", "prompt", []),
    ("/embed", {"prompt": "word " * 200}, 413, "request_too_large", "prompt", ["limit of 128"]),
    ("/embed", {"prompt": "x" * 100_001}, 413, "request_too_large", "prompt", ["100000"]),
    ("/embed", {"dimensions": 12}, 400, "invalid_request_error", "dimensions", ["32, 16, 8"]),
    ("/embed", {"dimensions": 64}, 400, "invalid_request_error", "dimensions", ["32, 16, 8"]),
    ("/embed", {"dimensions": 0}, 422, "validation_error", "dimensions", []),
    ("/embed", {"dimensions": -8}, 422, "validation_error", "dimensions", []),
    ("/embed", {"dimensions": "16"}, 422, "validation_error", "dimensions", []),
    ("/embed", {"dimensions": 16.0}, 422, "validation_error", "dimensions", []),
    ("/embed", {"truncation_direction": "up"}, 422, "validation_error", "truncation_direction", []),
    ("/embed", {"truncation_direction": "LEFT"}, 422, "validation_error", "truncation_direction", []),
    ("/embed", {"truncation_direction": None}, 422, "validation_error", "truncation_direction", []),
    ("/embed", {"inputs": "word " * 200, "prompt_name": "query"}, 413, "request_too_large", "inputs.0", ["128"]),
    ("/embed", {"model": "minilm", "dimensions": 128}, 400, "invalid_request_error", "dimensions",
     ["gives 384 (it is not a Matryoshka model)"]),
    ("/embed", {"model": "minilm", "prompt_name": "query"}, 400, "invalid_request_error", "prompt_name",
     ["its prompts: none"]),
    ("/v1/embeddings", {"input_type": "banana"}, 400, "invalid_request_error", "input_type",
     ["document", "search_query", "e5's prompts: query, passage"]),
    ("/v1/embeddings", {"input_type": "query", "prompt_name": "query"}, 400, "invalid_request_error", "input_type",
     ["not both"]),
    ("/v1/embeddings", {"input_type": 1}, 422, "validation_error", "input_type", []),
    ("/v1/embeddings", {"prompt_name": "nope"}, 400, "invalid_request_error", "prompt_name", ["query, passage"]),
    ("/v1/embeddings", {"dimensions": 24}, 400, "invalid_request_error", "dimensions", ["32, 16, 8"]),
    ("/v1/embeddings", {"truncation_direction": "middle"}, 422, "validation_error", "truncation_direction", []),
    ("/tokenize", {"inputs": []}, 422, "validation_error", "inputs", []),
    ("/tokenize", {"inputs": ["ok", " "]}, 422, "validation_error", "inputs.1", []),
    ("/tokenize", {"inputs": ["x"] * 257}, 413, "request_too_large", "inputs", ["256"]),
    ("/tokenize", {"inputs": 7}, 422, "validation_error", "inputs", []),
    ("/tokenize", {"add_special_tokens": "yes"}, 422, "validation_error", "add_special_tokens", []),
    ("/tokenize", {"truncate": True}, 422, "validation_error", "truncate", []),
    ("/tokenize", {"prompt_name": "nope"}, 400, "invalid_request_error", "prompt_name", ["query, passage"]),
    ("/tokenize", {"prompt_name": "query", "prompt": ""}, 400, "invalid_request_error", "prompt", ["not both"]),
    ("/tokenize", {"model": "gpt2", "prompt_name": "query"}, 400, "invalid_request_error", "prompt_name",
     ["gpt2 has no prompt 'query'; its prompts: none"]),
    ("/tokenize", {"model": "sentiment", "prompt": "word " * 200}, 413, "request_too_large", "prompt", ["limit of 128"]),
    ("/tokenize", {"model": "gpt-9"}, 404, "not_found_error", "model", ["gpt-9"]),
]


@pytest.mark.parametrize("route,body,status,kind,param,words", BAD)
def test_bad_options_get_a_clear_4xx_in_the_one_error_body(client, route, body, status, kind, param, words):
    field = "input" if route == "/v1/embeddings" else "inputs"
    r = post(client, route, {field: "cats purr", "model": "e5", **body})
    assert r.status_code == status, r.text
    assert r.json().keys() == {"error"}
    error = r.json()["error"]
    assert (error["type"], error["param"]) == (kind, param), error
    assert all(w in error["message"] for w in words), error["message"]


def test_the_client_takes_every_option(app, e5_tokenizer):
    with TestClient(app) as http, Client("http://testserver", http_client=http) as client:
        raw = np.array(client.embed(TEXTS, model="e5", prompt_name="query", normalize=False).embeddings)
        cut = client.embed(TEXTS, model="e5", prompt="query: ", dimensions=8, truncate=True,
                           truncation_direction="left")
        np.testing.assert_allclose(cut.embeddings, raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True),
                                   atol=1e-6)
        tokens = client.tokenize(TEXTS, model="e5", prompt_name="passage")
        assert [[t.id for t in row] for row in tokens] == [e5_tokenizer.ids("passage: " + t) for t in TEXTS]
        assert tokens[0][1].prompt and tokens[0][3].text == TEXTS[0][tokens[0][3].start : tokens[0][3].stop]
        (info,) = [m for m in client.models() if m.id == "e5"]
        assert info.matryoshka_dimensions == [32, 16, 8] and info.prompts == E5_PROMPTS

    async def main():
        async with app.router.lifespan_context(app), AsyncClient(
            "http://testserver", transport=httpx.ASGITransport(app=app)
        ) as client:
            result = await client.embed(TEXTS, model="e5", prompt_name="query", dimensions=16)
            tokens = await client.tokenize("cats purr", model="e5", add_special_tokens=False)
            return result, tokens

    result, tokens = asyncio.run(main())
    np.testing.assert_allclose(result.embeddings,
                               raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True), atol=1e-6)
    assert [t.text for t in tokens[0]] == ["cats", "pu", "rr"]

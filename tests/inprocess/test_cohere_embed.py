"""POST /v2/embed in Cohere's shape, driven by Cohere's own SDK (cohere==7.3.1, `ClientV2.embed`) unchanged on the
real app in process, against POST /embed with the same options; on `e5` (a tiny encoder with e5's query/passage
prompts and Matryoshka sizes 32, 16, 8)."""

from __future__ import annotations

import base64
import itertools

import cohere
import numpy as np
import pytest
from cohere.core.api_error import ApiError as CohereApiError
from helpers import post

TEXTS = ["how do cats purr", "A feline rested on a rug.", "Dogs bark at night."]
INPUT_TYPES = ("search_query", "search_document", "classification", "clustering")


@pytest.fixture(scope="module")
def co(client):
    # Starlette's TestClient is an httpx.Client: the SDK's requests go to the app in process.
    return cohere.ClientV2(api_key="unused", base_url="http://testserver", httpx_client=client, max_retries=0)


def embed(client, inputs, **options):
    r = post(client, "/embed", {"inputs": inputs, "model": "e5", **options})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_sdk_gets_the_same_float_vectors_as_embed_for_every_input_type(client, co):
    seen = []
    for input_type in INPUT_TYPES:
        r = co.embed(model="e5", input_type=input_type, texts=TEXTS, embedding_types=["float"])
        expected = embed(client, TEXTS, input_type=input_type)
        assert r.embeddings.float_ == expected["embeddings"]  # the same JSON numbers: the same float32 values
        assert r.texts == TEXTS and r.id and r.response_type == "embeddings_by_type"
        assert r.meta.billed_units.input_tokens == r.meta.tokens.input_tokens == expected["usage"]["prompt_tokens"]
        assert r.meta.api_version.version == "2"
        seen.append(r.embeddings.float_)
    # search_query and search_document are e5's query: and passage: prompts; classification and clustering,
    # which e5 has no prompt for, embed the text as it is.
    np.testing.assert_allclose(seen[0], embed(client, TEXTS, prompt_name="query")["embeddings"], atol=0)
    np.testing.assert_allclose(seen[1], embed(client, TEXTS, prompt_name="passage")["embeddings"], atol=0)
    np.testing.assert_allclose(seen[2], embed(client, TEXTS, prompt="")["embeddings"], atol=0)
    assert seen[2] == seen[3] and seen[0] != seen[1]


def test_base64_is_the_float32_bytes_and_types_come_as_asked(co):
    r = co.embed(model="e5", input_type="search_query", texts=TEXTS, embedding_types=["base64", "float"])
    floats = np.array(r.embeddings.float_, dtype=np.float32)
    decoded = np.array([np.frombuffer(base64.b64decode(s), "<f4") for s in r.embeddings.base64])
    np.testing.assert_array_equal(decoded, floats)
    assert r.embeddings.int8 is None and r.embeddings.binary is None


def test_output_dimension_truncate_and_inputs_match_embed(client, co):
    r = co.embed(model="e5", input_type="search_query", texts=TEXTS, output_dimension=16, embedding_types=["float"])
    assert r.embeddings.float_ == embed(client, TEXTS, input_type="search_query", dimensions=16)["embeddings"]
    assert len(r.embeddings.float_[0]) == 16
    long = ["word " * 1000 + "the end", "short"]
    for truncate, direction in (("END", "right"), ("START", "left")):
        r = co.embed(model="e5", input_type="search_document", texts=long, truncate=truncate,
                     embedding_types=["float"])
        expected = embed(client, long, input_type="search_document", truncate=True, truncation_direction=direction)
        assert r.embeddings.float_ == expected["embeddings"]
        assert embed(client, long, input_type="search_document", truncate=truncate) == expected
    start, end = (co.embed(model="e5", input_type="search_document", texts=long, truncate=t).embeddings.float_[0]
                  for t in ("START", "END"))
    assert start != end
    with pytest.raises(CohereApiError) as refused:
        co.embed(model="e5", input_type="search_document", texts=long, truncate="NONE")
    assert refused.value.status_code == 413 and refused.value.body["error"]["param"] == "texts.0"
    items = [cohere.EmbedInput(content=[cohere.TextEmbedContent(text=t)]) for t in TEXTS]
    by_inputs = co.embed(model="e5", input_type="search_query", inputs=items, embedding_types=["float"])
    by_texts = co.embed(model="e5", input_type="search_query", texts=TEXTS, embedding_types=["float"])
    assert by_inputs.embeddings.float_ == by_texts.embeddings.float_


@pytest.mark.parametrize("body,param", [
    ({"texts": TEXTS, "embedding_types": ["float", "float16"]}, "embedding_types.1"),
    ({"texts": TEXTS, "output_dimension": 12}, "output_dimension"),
    ({"texts": TEXTS, "input_type": "image"}, "input_type"),
    ({"texts": TEXTS, "input_type": "fiction"}, "input_type"),
    ({"texts": TEXTS, "truncate": "MIDDLE"}, "truncate"),
    ({"texts": TEXTS, "images": ["data:image/png;base64,AAAA"]}, "images"),
    ({"texts": TEXTS, "inputs": [{"content": [{"type": "text", "text": "a"}]}]}, "texts"),
    ({}, "texts"),
    ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "inputs.0.content"),
    ({"inputs": [{"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, "inputs.0.content"),
    ({"texts": TEXTS, "max_tokens": 8}, "max_tokens"),
])
def test_bad_input_is_a_4xx_naming_the_field(client, body, param):
    r = post(client, "/v2/embed", {"model": "e5", **body})
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["param"] == param, r.text


def test_embed_takes_cohere_options_and_refuses_them_mixed(client):
    by_type = embed(client, TEXTS, embedding_types=["float", "base64"], output_dimension=8)
    assert by_type["embeddings"]["float"] == embed(client, TEXTS, dimensions=8)["embeddings"]
    for body, param in (({"dimensions": 8, "output_dimension": 8}, "output_dimension"),
                        ({"input_type": "search_query", "prompt_name": "query"}, "input_type"),
                        ({"truncate": "START", "truncation_direction": "left"}, "truncation_direction")):
        r = post(client, "/embed", {"inputs": TEXTS, "model": "e5", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


QUANTIZED = ("int8", "uint8", "binary", "ubinary")
ALL_TYPES = ("float", *QUANTIZED, "base64")


def stored_ranges(served_build, name: str, precision: str, size: int) -> np.ndarray:
    import bentoml

    from bentoformers.runtime.card import ModelCard

    card = ModelCard.load(bentoml.models.get(served_build[name][precision].tag).path)
    return np.asarray(card.output_ranges[str(size)], dtype=np.float32)


def test_every_combination_of_types_in_one_call_is_sentence_transformers_quantization(co, served_build):
    from sentence_transformers.util.quantization import quantize_embeddings

    for size in (32, 16):
        ranges = stored_ranges(served_build, "e5", "fp32", size)
        reference = None
        for count in range(1, len(ALL_TYPES) + 1):
            for types in itertools.combinations(ALL_TYPES, count):
                r = co.embed(model="e5", input_type="search_document", texts=TEXTS, embedding_types=list(types),
                             output_dimension=size)
                got = {t: getattr(r.embeddings, "float_" if t == "float" else t) for t in ALL_TYPES}
                assert {t for t, v in got.items() if v is not None} == set(types)
                if reference is None:  # the first combination is ("float",)
                    reference = np.array(got["float"], dtype=np.float32)
                if "float" in types:
                    np.testing.assert_array_equal(np.array(got["float"], dtype=np.float32), reference)
                for kind in set(types) & set(QUANTIZED):
                    expected = quantize_embeddings(reference, kind, ranges=ranges)
                    np.testing.assert_array_equal(np.array(got[kind]), expected)
                if "base64" in types:
                    decoded = [np.frombuffer(base64.b64decode(s), "<f4") for s in got["base64"]]
                    np.testing.assert_array_equal(decoded, reference)
        assert reference is not None and reference.shape == (len(TEXTS), size)


def test_a_texts_quantized_output_is_the_same_alone_and_in_a_batch(client):
    together = embed(client, TEXTS, embedding_types=list(QUANTIZED))["embeddings"]
    for i, text in enumerate(TEXTS):
        alone = embed(client, [text], embedding_types=list(QUANTIZED))["embeddings"]
        assert {k: v[0] for k, v in alone.items()} == {k: v[i] for k, v in together.items()}


def test_models_list_the_types_they_offer_and_refuse_the_others_by_name(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["e5"]["embedding_types"] == ["float", "base64", *QUANTIZED]
    minilm = models["minilm"]
    figures = minilm["quantized_outputs"]
    assert set(figures) == set(QUANTIZED)
    print("minilm quantized outputs:", {k: (f["measure"], f["value"], f["gate"], f["offered"]) for k, f in figures.items()})
    for kind, f in figures.items():
        assert f["offered"] == (f["value"] >= f["gate"]) and (kind in minilm["embedding_types"]) == f["offered"]
        r = post(client, "/v2/embed", {"model": "minilm", "texts": TEXTS, "embedding_types": ["float", kind]})
        if f["offered"]:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == "embedding_types", r.text
            assert kind in r.json()["error"]["message"] and str(f["gate"]) in r.json()["error"]["message"]
    r = post(client, "/embed", {"model": "e5", "inputs": TEXTS, "embedding_types": ["int8"], "normalize": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "normalize", r.text

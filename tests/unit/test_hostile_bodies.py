"""Request bodies built to cost far more than their bytes: a 422 for a million wrong items must cost about what a
422 for one does (schemas.bounded, steps.parse_body)."""

from __future__ import annotations

import time
import tracemalloc

import orjson
import pytest

from bentoformers.api import schemas
from bentoformers.api.steps import parse_body
from bentoformers.errors import ApiError

MILLION = [1] * 1_000_000  # 1.9 MiB of JSON, every item the wrong type

# Every list field of every request body, each filled with a million wrong items.
BODIES = [
    (schemas.EmbedRequest, {"inputs": MILLION}, "inputs"),
    (schemas.OpenAIEmbeddingRequest, {"input": MILLION}, "input"),
    (schemas.TokenizeRequest, {"inputs": MILLION}, "inputs"),
    (schemas.ClassifyRequest, {"inputs": MILLION}, "inputs"),
    (schemas.ClassifyRequest, {"inputs": "x", "candidate_labels": MILLION}, "candidate_labels"),
    (schemas.NerRequest, {"inputs": MILLION}, "inputs"),
    (schemas.NerRequest, {"inputs": "x", "ignore_labels": MILLION}, "ignore_labels"),
    (schemas.RerankRequest, {"query": "q", "texts": MILLION}, "texts"),
    (schemas.CohereRerankRequest, {"query": "q", "documents": MILLION}, "documents"),
    (schemas.GenerateRequest, {"prompt": "p", "stop": MILLION}, "stop"),
    (schemas.CompletionRequest, {"prompt": MILLION}, "prompt"),
    (schemas.ChatCompletionRequest, {"messages": MILLION}, "messages"),
    (schemas.ChatCompletionRequest, {"messages": [{"role": "user", "content": MILLION}]}, "messages.0.content"),
]


@pytest.mark.parametrize("model,data,field", BODIES, ids=[f"{m.__name__}.{f}" for m, _, f in BODIES])
def test_a_million_wrong_items_get_a_quick_422_naming_the_field(model, data, field):
    body = orjson.dumps(data)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ApiError) as raised:
        parse_body(model, body)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\n{model.__name__}.{field}: {len(body) / 2**20:.1f} MiB body -> 422 in {seconds * 1000:.0f} ms, "
          f"peak {peak / 2**20:.0f} MiB traced")
    assert raised.value.status == 422 and raised.value.param.startswith(field), raised.value.message
    assert seconds < 2  # generous: not the seconds a million errors took to build


def test_a_list_over_the_schema_bound_is_refused_and_one_at_it_passes():
    at_bound = ["a"] * schemas.MAX_LIST_ITEMS
    assert len(parse_body(schemas.EmbedRequest, orjson.dumps({"inputs": at_bound})).inputs) == schemas.MAX_LIST_ITEMS
    with pytest.raises(ApiError) as raised:
        parse_body(schemas.EmbedRequest, orjson.dumps({"inputs": at_bound + ["a"]}))
    assert raised.value.param == "inputs" and f"at most {schemas.MAX_LIST_ITEMS}" in raised.value.message
    with pytest.raises(ApiError) as raised:
        parse_body(schemas.NerRequest, orjson.dumps({"inputs": "x", "ignore_labels": ["O"] * (schemas.MAX_IGNORE_LABELS + 1)}))
    assert raised.value.param == "ignore_labels"

"""Token classification: `POST /ner`, entities with character offsets into the original text, as Transformers'
token-classification pipeline gives them (runtime/entities.py).

Named `/ner`, the name users search for and the pipeline's own alias for the task; the task keeps its full
name, `token-classification`, in the model list, the scopes and /v1/models. A text over the model's token limit
is not refused: it is read in overlapping windows, and the answer says how many per text (`windows`).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.schemas import NerRequest
from bentoformers.api.steps import chooser_of, infer_charged, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import INLINE_TOKENIZE_CHARS
from bentoformers.observability import tracing
from bentoformers.runtime.encoder import softmax
from bentoformers.runtime.entities import find_entities, plan_windows


async def ner(request: Request) -> Response:
    """POST /ner: {"inputs": str | [str], "aggregation_strategy"?, "ignore_labels"?, "model"?}."""
    body = parse_body(NerRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "token-classification")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    endpoint.check_texts(texts, "inputs")
    large = sum(map(len, texts)) > INLINE_TOKENIZE_CHARS  # then tokenize and aggregate off the event loop
    with tracing.stage("tokenize"):
        encodings = await _maybe_in_thread(large, endpoint.tokenizer.encode_spans, texts)
    plans = [plan_windows(encoding, endpoint.card.max_length) for encoding in encodings]
    windows = [len(plan.ids) for plan in plans]
    limit = endpoint.settings.max_items_per_request
    if sum(windows) > limit:
        raise ApiError(
            ErrorType.TOO_LARGE,
            f"inputs make {sum(windows)} windows of the model's {endpoint.card.max_length} tokens; at most {limit} "
            "per request (each window is one sequence for the model): send fewer or shorter texts",
            param="inputs",
        )
    logits, tokens = await infer_charged(request, endpoint, [ids for plan in plans for ids in plan.ids])
    ignore_labels = frozenset(body.ignore_labels)  # looked up once per entity

    def entities() -> list[list[dict]]:
        results, first = [], 0
        for text, encoding, plan in zip(texts, encodings, plans):
            probabilities = softmax(logits[first + plan.window_of, plan.position_of])
            first += len(plan.ids)
            results.append(find_entities(
                text, encoding, probabilities, endpoint.tokenizer, endpoint.card.labels, body.aggregation_strategy,
                ignore_labels,
            ))
        return results

    results = await _maybe_in_thread(large, entities)
    return json_response({"model": endpoint.name, "results": results, "windows": windows,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _maybe_in_thread(in_thread: bool, fn, *args):
    return await asyncio.to_thread(fn, *args) if in_thread else fn(*args)


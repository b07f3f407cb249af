"""Sparse embeddings (SPLADE): `POST /embed_sparse` in text-embeddings-inference's shape. Per text, its terms'
weights as `{"index", "value"}` (the index is the token id in the model's vocabulary), non-zero ones only, in
ascending index order; `top_k` keeps a text's k largest (ties to the lower index), still listed by index."""

from __future__ import annotations

import asyncio

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.embeddings import prompt_for
from bentoformers.api.schemas import EmbedSparseRequest
from bentoformers.api.steps import chooser_of, infer_charged, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType

INLINE_TERMS = 4096  # an answer of more terms is built off the event loop (about 2 µs a term)


async def embed_sparse(request: Request) -> Response:
    """POST /embed_sparse: {"inputs": str | [str], "truncate"?, "truncation_direction"?, "prompt_name"?,
    "top_k"?, "model"?}; a list per text of {"index", "value"}."""
    body = parse_body(EmbedSparseRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "sparse-embeddings")
    prompt = prompt_for(endpoint, body.prompt_name, None)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    ids = await endpoint.tokenize(texts, body.truncate, "inputs", body.truncation_direction.lower(), prompt)
    rows, _ = await infer_charged(request, endpoint, ids)
    per_text = np.count_nonzero(rows, axis=1)
    if body.top_k is not None:
        per_text = np.minimum(per_text, body.top_k)
    count, limit = int(per_text.sum()), endpoint.settings.max_sparse_terms
    if count > limit:
        raise ApiError(ErrorType.TOO_LARGE, f"the answer would hold {count} terms; at most {limit} per request: send "
                       f"top_k (at most {limit // len(rows)} per text here) or fewer texts", param="top_k")
    if count > INLINE_TERMS:
        return json_response(await asyncio.to_thread(lambda: [terms(row, body.top_k) for row in rows]))
    return json_response([terms(row, body.top_k) for row in rows])


def terms(row: np.ndarray, top_k: int | None = None) -> list[dict]:
    """A row's non-zero weights by ascending index; with top_k, only its k largest (ties to the lower index)."""
    (nonzero,) = np.nonzero(row)
    if top_k is not None and top_k < len(nonzero):
        order = np.lexsort((nonzero, -row[nonzero]))  # by weight, descending; then by index
        nonzero = np.sort(nonzero[order[:top_k]])
    return [{"index": int(i), "value": float(v)} for i, v in zip(nonzero.tolist(), row[nonzero].tolist())]

"""Rerank: `POST /rerank` in the shape of Hugging Face's text-embeddings-inference (TEI), `POST /v1/rerank`
(Cohere v1 and Jina) and `POST /v2/rerank` (Cohere v2). Each document is scored with the query as one pair;
its relevance score is the sigmoid of the model's logit, and does not depend on the other documents sent."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.schemas import CohereRerankRequest, RerankRequest
from bentoformers.api.steps import chooser_of, infer_charged, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import (
    INLINE_TOKENIZE_CHARS,
    TRUNCATE_CHARS_PER_TOKEN,
    EncoderEndpoint,
)
from bentoformers.runtime.encoder import sigmoid

# Cohere and Jina fields this server cannot honour, with the values that ask for nothing: any other value is
# a 400 that names the field, never a silent ignore.
UNSUPPORTED = {
    "rank_fields": (None, ["text"]), "max_chunks_per_doc": (None,), "relevant_spans": (None, {"mode": "disabled"}),
}
DOCUMENTS_PER_SEARCH_UNIT = 100  # as Cohere bills


@dataclass(frozen=True)
class Ranking:
    model: str
    order: list[int]  # document indices, best first, at most top_n of them
    logits: np.ndarray  # per document, in the request's order
    tokens: int

    @property
    def scores(self) -> np.ndarray:
        return sigmoid(self.logits)


async def rank(
    request: Request,
    model: str | None,
    query: str,
    documents: list[str],
    truncate: bool,
    params: tuple[str, str],
    top_n: int | None = None,
    max_tokens_per_doc: int | None = None,
) -> Ranking:
    """The steps every rerank route shares: pick the model, check the query and documents, tokenize the
    pairs, charge their tokens, score them in the batched model call, sort best first, keep top_n."""
    endpoint = chooser_of(request).pick(model, "rerank")
    if truncate:
        # Only the first tokens are kept: do not tokenize (nor count) far past them.
        keep = endpoint.card.max_length * TRUNCATE_CHARS_PER_TOKEN
        query, documents = query[:keep], [d[:keep] for d in documents]
    await _check_query(endpoint, query, params[0], truncate)
    endpoint.check_texts(documents, params[1])
    if max_tokens_per_doc is not None:
        documents = await _cut(endpoint, documents, max_tokens_per_doc)
    ids = await endpoint.tokenize_pairs([(query, d) for d in documents], truncate, params[1])
    rows, tokens = await infer_charged(request, endpoint, ids)
    logits = np.asarray(rows).reshape(len(documents))
    # Sorted on the logits: the sigmoid ties distinct logits near 0 and 1. Ties keep the documents' order.
    order = np.argsort(-logits, kind="stable")[:top_n].tolist()
    return Ranking(endpoint.name, order, logits, tokens)


async def _check_query(endpoint: EncoderEndpoint, query: str, param: str, truncate: bool) -> None:
    if truncate:
        endpoint.check_text(query, param)
        return
    # Once, before it is tokenized again with every document: a query that leaves no room for one.
    tokens = len(await endpoint.text_ids(query, param))
    if tokens >= endpoint.card.max_length:
        raise ApiError(
            ErrorType.TOO_LARGE,
            f"{param} has {tokens} tokens, leaving no room for a document in the model's limit of "
            f"{endpoint.card.max_length}; shorten it or send truncate: true",
            param=param,
        )


async def _cut(endpoint: EncoderEndpoint, documents: list[str], count: int) -> list[str]:
    def cut() -> list[str]:
        return [endpoint.tokenizer.first_tokens(d, count) for d in documents]

    return await asyncio.to_thread(cut) if sum(map(len, documents)) > INLINE_TOKENIZE_CHARS else cut()


async def rerank(request: Request) -> Response:
    """POST /rerank (TEI): {"query", "texts", "raw_scores"?, "return_text"?, "truncate"?, "model"?}; a list of
    {"index", "score", "text"?}, best first."""
    body = parse_body(RerankRequest, await request.body())
    if body.truncation_direction != "Right":
        raise ApiError(ErrorType.INVALID_REQUEST, "only truncation_direction Right is supported",
                       param="truncation_direction")
    ranking = await rank(request, body.model, body.query, body.texts, body.truncate, ("query", "texts"))
    values = ranking.logits if body.raw_scores else ranking.scores
    return json_response([
        {"index": i, "score": float(values[i])} | ({"text": body.texts[i]} if body.return_text else {})
        for i in ranking.order
    ])


async def rerank_v1(request: Request) -> Response:
    """POST /v1/rerank (Cohere v1 and Jina): documents are returned unless return_documents is false (Jina's
    default)."""
    return await _cohere(request, version="1", return_documents=True)


async def rerank_v2(request: Request) -> Response:
    """POST /v2/rerank (Cohere v2): documents are returned only with return_documents: true."""
    return await _cohere(request, version="2", return_documents=False)


async def _cohere(request: Request, version: str, return_documents: bool) -> Response:
    body = parse_body(CohereRerankRequest, await request.body(), refuse=_refuse_unsupported)
    ranking = await rank(request, body.model, body.query, body.documents, body.truncate, ("query", "documents"),
                         body.top_n, body.max_tokens_per_doc)
    scores = ranking.scores
    with_documents = return_documents if body.return_documents is None else body.return_documents
    results = [
        {"index": i, "relevance_score": float(scores[i])} | ({"document": {"text": body.documents[i]}}
                                                             if with_documents else {})
        for i in ranking.order
    ]
    request_id = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
    return json_response({
        "id": request_id,
        "model": ranking.model,
        "results": results,
        "meta": {
            "api_version": {"version": version},
            "billed_units": {"search_units": math.ceil(len(body.documents) / DOCUMENTS_PER_SEARCH_UNIT)},
            "tokens": {"input_tokens": ranking.tokens},
        },
        "usage": {"prompt_tokens": ranking.tokens, "total_tokens": ranking.tokens},
    })


def _refuse_unsupported(data: object) -> None:
    if not isinstance(data, dict):
        return
    for name, harmless in UNSUPPORTED.items():
        if name in data and data[name] not in harmless:
            raise ApiError(ErrorType.INVALID_REQUEST, f"{name} is not supported by this server; remove it from the "
                           "request", param=name)

"""Embeddings: `POST /embed` and the OpenAI shape, `POST /v1/embeddings`."""

from __future__ import annotations

import base64

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.endpoint import ModelEndpoint
from bentoformers.api.gateway import account, gateway_of, json_response, parse_body
from bentoformers.api.schemas import EmbedRequest, OpenAIEmbeddingRequest
from bentoformers.errors import ApiError, ErrorType
from bentoformers.runtime.encoder import l2_normalize


async def embed(request: Request) -> Response:
    """POST /embed: {"inputs": str | [str], "normalize"?, "truncate"?, "model"?}."""
    body = parse_body(EmbedRequest, await request.body())
    endpoint = gateway_of(request).pick(body.model, "embeddings")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    vectors, tokens = await _embed(request, endpoint, texts, body.truncate, body.normalize, "inputs")
    return json_response({
        "model": endpoint.name,
        "embeddings": vectors,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def _embed(
    request: Request, endpoint: ModelEndpoint, texts: list[str], truncate: bool, normalize: bool | None, param: str
) -> tuple[np.ndarray, int]:
    ids = await endpoint.tokenize(texts, truncate, param)
    tokens = sum(map(len, ids))
    await account(request, endpoint, tokens)
    vectors = await endpoint.infer(ids)
    if endpoint.card.normalize if normalize is None else normalize:
        vectors = l2_normalize(vectors)
    return vectors, tokens


async def openai_embeddings(request: Request) -> Response:
    """POST /v1/embeddings in the OpenAI shape."""
    body = parse_body(OpenAIEmbeddingRequest, await request.body())
    endpoint = gateway_of(request).pick(body.model, "embeddings")
    if body.dimensions is not None and body.dimensions != endpoint.card.dimensions:
        raise ApiError(
            ErrorType.VALIDATION,
            f"{endpoint.name} gives {endpoint.card.dimensions} dimensions; it cannot give {body.dimensions}",
            param="dimensions",
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors, tokens = await _embed(request, endpoint, texts, body.truncate, None, "input")
    if body.encoding_format == "base64":
        items = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        items = list(vectors)
    return json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": endpoint.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })

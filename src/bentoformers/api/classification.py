"""Classification: `POST /classify` (softmax, or a sigmoid per label for multi-label models)."""

from __future__ import annotations

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.gateway import gateway_of, infer_charged, json_response, parse_body
from bentoformers.api.schemas import ClassifyRequest
from bentoformers.runtime.encoder import label_scores


async def classify(request: Request) -> Response:
    """POST /classify: {"inputs": str | [str], "top_k"?: int | null (all), "truncate"?, "model"?}."""
    body = parse_body(ClassifyRequest, await request.body())
    endpoint = gateway_of(request).pick(body.model, "classification")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    ids = await endpoint.tokenize(texts, body.truncate, "inputs")
    logits, tokens = await infer_charged(request, endpoint, ids)
    scores = label_scores(logits, endpoint.card.multi_label)
    labels = endpoint.card.labels
    top_k = len(labels) if body.top_k is None else min(body.top_k, len(labels))
    results = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:top_k]
        results.append([{"label": labels[i], "score": float(row[i])} for i in order])
    return json_response({"model": endpoint.name, "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

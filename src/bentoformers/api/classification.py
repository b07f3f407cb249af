"""Classification: `POST /classify`, by the model's own labels (softmax, or a sigmoid per label for multi-label
models), or zero-shot by the labels the caller names, on an NLI model."""

from __future__ import annotations

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.schemas import ClassifyRequest
from bentoformers.api.steps import chooser_of, infer_charged, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import TRUNCATE_CHARS_PER_TOKEN, EncoderEndpoint
from bentoformers.runtime.encoder import label_scores, softmax


async def classify(request: Request) -> Response:
    """POST /classify: {"inputs": str | [str], "top_k"?: int | null (all), "truncate"?, "model"?}, and for
    zero-shot {"candidate_labels": [str], "hypothesis_template"?, "multi_label"?}."""
    body = parse_body(ClassifyRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "classification")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if body.candidate_labels is None:
        ids = await endpoint.tokenize(texts, body.truncate, "inputs")
        logits, tokens = await infer_charged(request, endpoint, ids)
        labels, scores = endpoint.card.labels, label_scores(logits, endpoint.card.multi_label)
    else:
        labels = body.candidate_labels
        scores, tokens = await _zero_shot(request, endpoint, texts, body)
    top_k = len(labels) if body.top_k is None else min(body.top_k, len(labels))
    results = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:top_k]
        results.append([{"label": labels[i], "score": float(row[i])} for i in order])
    return json_response({"model": endpoint.name, "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _zero_shot(
    request: Request, endpoint: EncoderEndpoint, texts: list[str], body: ClassifyRequest
) -> tuple[np.ndarray, int]:
    """Scores (texts x labels) as Transformers' zero-shot pipeline gives them: the entailment logits of the
    labels softmaxed against each other, or with multi_label (or a single label) each label's entailment
    against its contradiction."""
    card, labels = endpoint.card, body.candidate_labels
    assert labels is not None
    if card.entailment_index < 0:
        raise ApiError(
            ErrorType.INVALID_REQUEST,
            f"{endpoint.name} is not a zero-shot model (no entailment label among {', '.join(card.labels)}); "
            "candidate_labels needs an NLI classifier",
            param="candidate_labels",
        )
    template = body.hypothesis_template
    limit = endpoint.settings.max_template_chars
    if len(template) > limit:
        raise ApiError(
            ErrorType.TOO_LARGE, f"hypothesis_template has {len(template)} characters; at most {limit}",
            param="hypothesis_template",
        )
    if template.count("{}") != 1:
        raise ApiError(
            ErrorType.VALIDATION, "hypothesis_template must hold {} once, where each label goes",
            param="hypothesis_template",
        )
    if body.truncate:  # only the premise's first tokens are kept: do not tokenize (nor count) far past them
        texts = [text[: card.max_length * TRUNCATE_CHARS_PER_TOKEN] for text in texts]
    endpoint.check_texts(texts, "inputs")
    endpoint.check_texts(labels, "candidate_labels")
    if len(set(labels)) != len(labels):
        raise ApiError(ErrorType.VALIDATION, "candidate_labels holds a label twice", param="candidate_labels")
    hypotheses = [template.replace("{}", label) for label in labels]
    pairs = [(text, hypothesis) for text in texts for hypothesis in hypotheses]
    # As the pipeline truncates: the premise, never the hypothesis.
    ids = await endpoint.tokenize_pairs(
        pairs, body.truncate, "inputs", item_of=lambda pair: pair // len(labels), strategy="only_first"
    )
    logits, tokens = await infer_charged(request, endpoint, ids)
    logits = logits.reshape(len(texts), len(labels), -1)
    entailment = card.entailment_index
    if body.multi_label or len(labels) == 1:
        contradiction = -1 if entailment == 0 else 0
        return softmax(logits[..., [contradiction, entailment]])[..., 1], tokens
    return softmax(logits[..., entailment]), tokens

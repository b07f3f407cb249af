"""Embeddings: `POST /embed` and the OpenAI shape, `POST /v1/embeddings`, with their options: a prompt before
each text, truncation on either side, and Matryoshka sizes (a vector cut to its first values, then
L2-normalised, as sentence-transformers' truncate_dim with normalisation gives it)."""

from __future__ import annotations

import base64

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.schemas import EmbedRequest, OpenAIEmbeddingRequest
from bentoformers.api.steps import chooser_of, infer_charged, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import EncoderEndpoint, ModelEndpoint
from bentoformers.runtime.encoder import l2_normalize

# OpenAI-compatible `input_type` values (Voyage, Cohere, NVIDIA NIM) -> the prompt names that serve them, in
# the order they are looked for among a model's prompts.
INPUT_TYPES = {
    "query": ("query", "search_query"),
    "search_query": ("search_query", "query"),
    "document": ("document", "passage", "search_document"),
    "passage": ("passage", "document", "search_document"),
    "search_document": ("search_document", "document", "passage"),
}


async def embed(request: Request) -> Response:
    """POST /embed: {"inputs": str | [str], "normalize"?, "truncate"?, "truncation_direction"?, "prompt_name"?,
    "prompt"?, "dimensions"?, "model"?}."""
    body = parse_body(EmbedRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "embeddings")
    prompt = prompt_for(endpoint, body.prompt_name, body.prompt)
    check_dimensions(endpoint, body.dimensions)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    vectors, tokens = await _embed(request, endpoint, texts, body.truncate, body.truncation_direction.lower(), prompt,
                                   body.normalize, body.dimensions, "inputs")
    return json_response({
        "model": endpoint.name,
        "embeddings": vectors,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def openai_embeddings(request: Request) -> Response:
    """POST /v1/embeddings in the OpenAI shape."""
    body = parse_body(OpenAIEmbeddingRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "embeddings")
    if body.input_type is not None and body.prompt_name is not None:
        raise ApiError(ErrorType.INVALID_REQUEST, "send input_type or prompt_name, not both", param="input_type")
    if body.input_type is None:
        prompt = prompt_for(endpoint, body.prompt_name, None)
    else:
        name = _input_type_prompt(endpoint, body.input_type)
        prompt = prompt_for(endpoint, name, None if name else "")
    check_dimensions(endpoint, body.dimensions)
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors, tokens = await _embed(request, endpoint, texts, body.truncate, body.truncation_direction.lower(), prompt,
                                   None, body.dimensions, "input")
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


async def _embed(
    request: Request, endpoint: EncoderEndpoint, texts: list[str], truncate: bool, direction: str, prompt: str,
    normalize: bool | None, dimensions: int | None, param: str,
) -> tuple[np.ndarray, int]:
    ids = await endpoint.tokenize(texts, truncate, param, direction, prompt)
    vectors, tokens = await infer_charged(request, endpoint, ids)
    unit = endpoint.card.normalize if normalize is None else normalize
    if dimensions is not None and dimensions < vectors.shape[1]:
        # A cut vector is no longer unit length, even from a normalising model: normalised again unless the
        # request asks for the raw values.
        vectors = np.ascontiguousarray(vectors[:, :dimensions])  # orjson writes contiguous arrays only
        unit = normalize is not False
    if unit:
        vectors = l2_normalize(vectors)
    return vectors, tokens


def prompt_for(endpoint: ModelEndpoint, prompt_name: str | None, prompt: str | None) -> str:
    """The text put before each input: a raw `prompt`, the named prompt, else the model's default prompt."""
    card = endpoint.card
    if prompt is not None and prompt_name is not None:
        raise ApiError(ErrorType.INVALID_REQUEST, "send prompt or prompt_name, not both", param="prompt")
    if prompt_name is not None:
        if prompt_name not in card.prompts:
            raise ApiError(ErrorType.INVALID_REQUEST, f"{endpoint.name} has no prompt {prompt_name!r}; "
                           f"its prompts: {', '.join(card.prompts) or 'none'}", param="prompt_name")
        prompt = card.prompts[prompt_name]
    elif prompt is None:
        prompt = card.prompts.get(card.default_prompt_name, "")
    if prompt:
        _check_prompt(endpoint, prompt, "prompt" if prompt_name is None else "prompt_name")
    return prompt


def _check_prompt(endpoint: EncoderEndpoint, prompt: str, param: str) -> None:
    limit = endpoint.settings.max_chars_per_item
    if len(prompt) > limit:
        raise ApiError(ErrorType.TOO_LARGE, f"the prompt has {len(prompt)} characters; at most {limit}", param=param)
    tokens = len(endpoint.tokenizer.ids(prompt))
    if tokens >= endpoint.card.max_length:
        raise ApiError(
            ErrorType.TOO_LARGE,
            f"the prompt has {tokens} tokens with the special tokens, which leaves no room for a text within the "
            f"model's limit of {endpoint.card.max_length}",
            param=param,
        )


def _input_type_prompt(endpoint: EncoderEndpoint, input_type: str) -> str | None:
    """The prompt name an OpenAI-style `input_type` stands for on this model; None where the model has no
    prompt for it (a symmetric model, or one that prompts only its queries: the text goes in as it is)."""
    prompts = endpoint.card.prompts
    if input_type in prompts:
        return input_type
    if input_type not in INPUT_TYPES:
        known = sorted({*INPUT_TYPES, *prompts})
        raise ApiError(ErrorType.INVALID_REQUEST, f"input_type {input_type!r} is not one of {', '.join(known)} "
                       f"({endpoint.name}'s prompts: {', '.join(prompts) or 'none'})", param="input_type")
    return next((name for name in INPUT_TYPES[input_type] if name in prompts), None)


def embedding_sizes(endpoint: EncoderEndpoint) -> list[int]:
    """The vector sizes a request may ask for, largest first: the full size and the Matryoshka ones."""
    card = endpoint.card
    return sorted({card.dimensions, *card.matryoshka_dimensions}, reverse=True)


def check_dimensions(endpoint: EncoderEndpoint, dimensions: int | None) -> None:
    sizes = embedding_sizes(endpoint)
    if dimensions is not None and dimensions not in sizes:
        what = f"its sizes: {', '.join(map(str, sizes))}" if len(sizes) > 1 else \
            f"it gives {sizes[0]} (it is not a Matryoshka model)"
        raise ApiError(ErrorType.INVALID_REQUEST, f"{endpoint.name} cannot give {dimensions} dimensions; {what}",
                       param="dimensions")

"""Embeddings: `POST /embed`, the OpenAI shape, `POST /v1/embeddings`, and Cohere's, `POST /v2/embed`, with their
options: a prompt before each text (or an `input_type` that names one), truncation on either side, Matryoshka
sizes (a vector cut to its first values, then L2-normalised, as sentence-transformers' truncate_dim with
normalisation gives it) and Cohere's output types (float, base64, the quantized ones: runtime/outputs.py)."""

from __future__ import annotations

import uuid

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.schemas import CohereEmbedRequest, EmbedRequest, OpenAIEmbeddingRequest
from bentoformers.api.steps import chooser_of, infer_charged, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import EncoderEndpoint, ModelEndpoint
from bentoformers.runtime.encoder import l2_normalize
from bentoformers.runtime.outputs import CALIBRATED, QUANTIZED, b64_f32le, quantize, ranges_of

# OpenAI-compatible `input_type` values (Voyage, Cohere, NVIDIA NIM) -> the prompt names that serve them, in
# the order they are looked for among a model's prompts.
INPUT_TYPES = {
    "query": ("query", "search_query"),
    "search_query": ("search_query", "query"),
    "document": ("document", "passage", "search_document"),
    "passage": ("passage", "document", "search_document"),
    "search_document": ("search_document", "document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
# Cohere's `truncate`: END cuts a text's end (our right), START its start (our left), NONE refuses it.
COHERE_TRUNCATE = {"END": (True, "right"), "START": (True, "left"), "NONE": (False, "right")}


async def embed(request: Request) -> Response:
    """POST /embed: {"inputs": str | [str], "normalize"?, "truncate"?, "truncation_direction"?, "prompt_name"?,
    "prompt"?, "input_type"?, "dimensions"? (or "output_dimension"), "embedding_types"?, "model"?}."""
    body = parse_body(EmbedRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "embeddings")
    if body.input_type is not None and (body.prompt_name is not None or body.prompt is not None):
        raise ApiError(ErrorType.INVALID_REQUEST, "send input_type, prompt_name or prompt, not two of them",
                       param="input_type")
    prompt = (_input_type_prompt_text(endpoint, body.input_type) if body.input_type is not None
              else prompt_for(endpoint, body.prompt_name, body.prompt))
    if body.dimensions is not None and body.output_dimension is not None:
        raise ApiError(ErrorType.INVALID_REQUEST, "send dimensions or output_dimension, not both",
                       param="output_dimension")
    dimensions, param = ((body.dimensions, "dimensions") if body.output_dimension is None
                         else (body.output_dimension, "output_dimension"))
    check_dimensions(endpoint, dimensions, param)
    truncate, direction = body.truncate, body.truncation_direction.lower()
    if isinstance(truncate, str):
        if "truncation_direction" in body.model_fields_set:
            raise ApiError(ErrorType.INVALID_REQUEST, f"truncate {truncate!r} says the side to cut; send it or "
                           "truncation_direction, not both", param="truncation_direction")
        truncate, direction = COHERE_TRUNCATE[truncate]
    if body.embedding_types is not None:
        check_types(endpoint, body.embedding_types, body.normalize)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    vectors, tokens = await _embed(request, endpoint, texts, truncate, direction, prompt, body.normalize, dimensions,
                                   "inputs")
    return json_response({
        "model": endpoint.name,
        "embeddings": vectors if body.embedding_types is None else by_type(endpoint, vectors, body.embedding_types),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def cohere_embed(request: Request) -> Response:
    """POST /v2/embed in Cohere's shape: {"texts" | "inputs", "model"?, "input_type"?, "embedding_types"?,
    "output_dimension"?, "truncate"?}."""
    body = parse_body(CohereEmbedRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "embeddings")
    texts = _cohere_texts(body)
    if body.max_tokens is not None:
        raise ApiError(ErrorType.INVALID_REQUEST, "max_tokens is not supported by this server; use truncate (the "
                       "model's own limit)", param="max_tokens")
    prompt = "" if body.input_type is None else _input_type_prompt_text(endpoint, body.input_type)
    check_dimensions(endpoint, body.output_dimension, "output_dimension")
    check_types(endpoint, body.embedding_types, None)
    truncate, direction = COHERE_TRUNCATE[body.truncate]
    param = "texts" if body.texts is not None else "inputs"
    vectors, tokens = await _embed(request, endpoint, texts, truncate, direction, prompt, None, body.output_dimension,
                                   param)
    return json_response({
        "id": request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex,
        "response_type": "embeddings_by_type",
        "embeddings": by_type(endpoint, vectors, body.embedding_types),
        "texts": texts,
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {"input_tokens": tokens},
            "tokens": {"input_tokens": tokens},
        },
    })


def _cohere_texts(body: CohereEmbedRequest) -> list[str]:
    if body.images:
        raise ApiError(ErrorType.INVALID_REQUEST, "images are not supported by this server (a text model)",
                       param="images")
    if (body.texts is None) == (body.inputs is None):
        raise ApiError(ErrorType.INVALID_REQUEST, "send texts or inputs (one of them)", param="texts")
    if body.texts is not None:
        return body.texts
    texts = []
    for i, item in enumerate(body.inputs):
        # Cohere embeds an input's items together; a text model has one text to embed per input.
        if len(item.content) != 1 or item.content[0].type != "text" or item.content[0].text is None:
            raise ApiError(ErrorType.INVALID_REQUEST, "each input takes one item, of type text (images are not "
                           "supported by this server)", param=f"inputs.{i}.content")
        texts.append(item.content[0].text)
    return texts


def check_types(endpoint: EncoderEndpoint, types: list[str], normalize: bool | None) -> None:
    """Each requested output type is one this model offers: float and base64 always, a quantized type when its
    ranges were calibrated at build and it passed its gate there."""
    for kind in types:
        if kind in QUANTIZED:
            refused = refused_type(endpoint, kind)
            if refused:
                raise ApiError(ErrorType.INVALID_REQUEST, refused, param="embedding_types")
            if normalize is not None:
                raise ApiError(ErrorType.INVALID_REQUEST, f"{kind} is calibrated on {endpoint.name}'s vectors as it "
                               "serves them by default: leave normalize out", param="normalize")


def refused_type(endpoint: EncoderEndpoint, kind: str) -> str | None:
    """Why this model does not offer a quantized output type; None where it does."""
    figures = endpoint.card.output_types.get(kind)
    if figures is None:
        return f"{endpoint.name} does not offer {kind}: its build calibrated no quantized outputs"
    if not figures["offered"]:
        return (f"{endpoint.name} does not offer {kind}: its {figures['measure']} against float is "
                f"{figures['value']}, below its gate of {figures['gate']}")
    return None


def by_type(endpoint: EncoderEndpoint, vectors: np.ndarray, types: list[str]) -> dict:
    out = {}
    for kind in dict.fromkeys(types):
        if kind == "float":
            out[kind] = vectors
        elif kind == "base64":
            out[kind] = b64_f32le(vectors)
        elif kind in CALIBRATED:
            out[kind] = quantize(vectors, kind, ranges_of(endpoint.card.output_ranges, vectors.shape[1]))
        else:
            out[kind] = quantize(vectors, kind)
    return out


async def openai_embeddings(request: Request) -> Response:
    """POST /v1/embeddings in the OpenAI shape."""
    body = parse_body(OpenAIEmbeddingRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "embeddings")
    if body.input_type is not None and body.prompt_name is not None:
        raise ApiError(ErrorType.INVALID_REQUEST, "send input_type or prompt_name, not both", param="input_type")
    if body.input_type is None:
        prompt = prompt_for(endpoint, body.prompt_name, None)
    else:
        prompt = _input_type_prompt_text(endpoint, body.input_type)
    check_dimensions(endpoint, body.dimensions)
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors, tokens = await _embed(request, endpoint, texts, body.truncate, body.truncation_direction.lower(), prompt,
                                   None, body.dimensions, "input")
    if body.encoding_format == "base64":
        items = b64_f32le(vectors)
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


def _input_type_prompt_text(endpoint: EncoderEndpoint, input_type: str) -> str:
    if input_type == "image":
        raise ApiError(ErrorType.INVALID_REQUEST, "input_type image is not supported by this server (a text model)",
                       param="input_type")
    name = _input_type_prompt(endpoint, input_type)
    return prompt_for(endpoint, name, None if name else "")


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


def check_dimensions(endpoint: EncoderEndpoint, dimensions: int | None, param: str = "dimensions") -> None:
    sizes = embedding_sizes(endpoint)
    if dimensions is not None and dimensions not in sizes:
        what = f"its sizes: {', '.join(map(str, sizes))}" if len(sizes) > 1 else \
            f"it gives {sizes[0]} (it is not a Matryoshka model)"
        raise ApiError(ErrorType.INVALID_REQUEST, f"{endpoint.name} cannot give {dimensions} dimensions; {what}",
                       param=param)

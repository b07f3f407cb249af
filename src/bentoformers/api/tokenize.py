"""`POST /tokenize` (TEI's shape): the tokens any served model would see, with their character offsets.

It runs no model, but its answer is some 80 bytes per token: the tokens it returns are bounded per request
(`max_tokenize_tokens`) and charged to the caller's token budget like a model's input tokens.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.embeddings import prompt_for
from bentoformers.api.schemas import TokenizeRequest
from bentoformers.api.steps import chooser_of, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import INLINE_TOKENIZE_CHARS
from bentoformers.runtime.tokenizer import token_rows
from bentoformers.security.ratelimit import charge_tokens


async def tokenize(request: Request) -> Response:
    """POST /tokenize: {"inputs": str | [str], "add_special_tokens"?, "prompt_name"?, "prompt"?, "model"?} ->
    per input, [{"id", "text", "special", "start", "stop", "prompt"}, ...]."""
    body = parse_body(TokenizeRequest, await request.body())
    endpoint = chooser_of(request).pick_any(body.model)
    request.state.model = endpoint.name
    prompt = prompt_for(endpoint, body.prompt_name, body.prompt)  # only embedding models have named prompts
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    endpoint.check_texts(texts, "inputs", prompt)  # the limits of every text route
    large = sum(map(len, texts)) + len(prompt) * len(texts) > INLINE_TOKENIZE_CHARS
    prompted = [prompt + text for text in texts]
    if large:
        encodings = await asyncio.to_thread(endpoint.tokenizer.encodings, prompted, body.add_special_tokens)
    else:
        encodings = endpoint.tokenizer.encodings(prompted, body.add_special_tokens)
    count = sum(map(len, encodings))
    limit = endpoint.settings.max_tokenize_tokens
    if count > limit:
        raise ApiError(
            ErrorType.TOO_LARGE,
            f"inputs make {count} tokens; /tokenize returns at most {limit} per request: send fewer or shorter texts",
            param="inputs",
        )
    await charge_tokens(request, count, "tokens returned")
    request.state.tokens = count
    tokens = await asyncio.to_thread(_tokens, texts, encodings, prompt) if large else _tokens(texts, encodings, prompt)
    return json_response(tokens)


def _tokens(texts: list[str], encodings: list, prompt: str) -> list[list[dict]]:
    """Each text's tokens, tokenized as `prompt + text` (as the embedding is), with offsets into the text alone:
    the prompt's tokens have none."""
    out = []
    for text, encoding in zip(texts, encodings, strict=True):
        tokens = []
        for token_id, token, special, start, stop in token_rows(encoding):
            in_prompt = not special and stop <= len(prompt)
            if special or in_prompt:
                surface = token if special else prompt[start:stop]
                tokens.append({"id": token_id, "text": surface, "special": special, "start": None, "stop": None,
                               "prompt": in_prompt})
                continue
            start, stop = max(start - len(prompt), 0), stop - len(prompt)
            tokens.append({"id": token_id, "text": text[start:stop], "special": False, "start": start, "stop": stop,
                           "prompt": False})
        out.append(tokens)
    return out

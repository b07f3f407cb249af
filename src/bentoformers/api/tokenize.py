"""`POST /tokenize` (TEI's shape): the tokens any served model would see, with their character offsets.

It runs no model, so it counts no tokens against the caller's budget; it still needs a valid credential and
counts against the caller's requests.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.embeddings import prompt_for
from bentoformers.api.schemas import TokenizeRequest
from bentoformers.api.steps import chooser_of, json_response, parse_body
from bentoformers.gateway.endpoint import INLINE_TOKENIZE_CHARS, ModelEndpoint


async def tokenize(request: Request) -> Response:
    """POST /tokenize: {"inputs": str | [str], "add_special_tokens"?, "prompt_name"?, "prompt"?, "model"?} ->
    per input, [{"id", "text", "special", "start", "stop", "prompt"}, ...]."""
    body = parse_body(TokenizeRequest, await request.body())
    endpoint = chooser_of(request).pick_any(body.model)
    request.state.model = endpoint.name
    prompt = prompt_for(endpoint, body.prompt_name, body.prompt)  # only embedding models have named prompts
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    endpoint.check_texts(texts, "inputs")  # the limits of every text route
    if sum(map(len, texts)) + len(prompt) * len(texts) > INLINE_TOKENIZE_CHARS:
        tokens = await asyncio.to_thread(_tokens, endpoint, texts, prompt, body.add_special_tokens)
    else:
        tokens = _tokens(endpoint, texts, prompt, body.add_special_tokens)
    return json_response(tokens)


def _tokens(endpoint: ModelEndpoint, texts: list[str], prompt: str, add_special_tokens: bool) -> list[list[dict]]:
    """Each text's tokens, tokenized as `prompt + text` (as the embedding is), with offsets into the text alone:
    the prompt's tokens have none."""
    out = []
    for text in texts:
        tokens = []
        for token_id, token, special, start, stop in endpoint.tokenizer.tokens(prompt + text, add_special_tokens):
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

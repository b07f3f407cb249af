"""Generation: `POST /generate` and the OpenAI shape, `POST /v1/completions`, whole or streamed."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.endpoint import ModelEndpoint, unavailable_error
from bentoformers.api.gateway import account, gateway_of, json_response, parse_body
from bentoformers.api.schemas import CompletionRequest, GenerateRequest, GenerateTextRequest
from bentoformers.api.sse import event_stream, text_stream
from bentoformers.errors import ApiError, ErrorType

logger = logging.getLogger("bentoformers.gateway")


MAX_STOPS = 4


@dataclass
class _Plan:
    """A validated generation request: prompt ids, token budget, sampling, stop strings."""

    ids: list[int]
    max_new_tokens: int
    sampling: dict[str, Any]
    stops: list[str]


async def _plan(
    endpoint: ModelEndpoint, prompt: str, max_new_tokens: int | None, max_param: str, sampling: dict[str, Any],
    stop: str | list[str] | None,
) -> _Plan:
    limit = endpoint.settings.max_new_tokens
    if max_new_tokens is not None and max_new_tokens > limit:
        raise ApiError(
            ErrorType.VALIDATION, f"{max_param} is {max_new_tokens}; this server allows at most {limit}", param=max_param
        )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(ErrorType.VALIDATION, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
    ids = await endpoint.prompt_ids(prompt, "prompt")
    wanted = min(max_new_tokens or endpoint.settings.default_max_new_tokens, limit)
    # The context holds prompt and new tokens; past it the generation ends with finish_reason "length".
    return _Plan(ids, min(wanted, endpoint.card.max_length - len(ids)), sampling, stops)


async def _text_events(endpoint: ModelEndpoint, plan: _Plan) -> AsyncIterator[tuple[str, str | None, int]]:
    """(new text, finish reason or None, completion tokens so far). Text that might begin a stop string is
    held back until it is known not to; a stop string ends the generation and is not returned."""
    decoder = endpoint.tokenizer.decode_stream()
    hold = max((len(s) for s in plan.stops), default=1) - 1
    text, sent, tokens, finish = "", 0, 0, "length"
    async with aclosing(endpoint.generate(plan.ids, plan.max_new_tokens, plan.sampling)) as items:
        async for item in items:
            if isinstance(item, str):
                finish = item
                break
            tokens += 1
            text += decoder.step(item)
            found = [i for i in (text.find(s, max(0, sent - hold)) for s in plan.stops) if i >= 0]
            if found:
                yield text[sent : min(found)], "stop", tokens
                return
            ready = len(text) - hold
            if ready > sent:
                yield text[sent:ready], None, tokens
                sent = ready
    yield text[sent:], finish, tokens


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _start(request: Request, endpoint: ModelEndpoint, plan: _Plan) -> tuple[AsyncIterator[tuple[str, str | None, int]], tuple[str, str | None, int]]:
    """Starts the generation and waits for its first text, so a failure to start is still a plain HTTP error."""
    endpoint.check_generation_capacity()  # before the tokens are charged: a refused request costs nothing
    await account(request, endpoint, len(plan.ids))
    events = _text_events(endpoint, plan)
    try:
        first = await anext(events)
    except ApiError:
        raise
    except Exception as exc:
        if not unavailable_error(exc):
            raise  # a bug: the app's handler logs it with its traceback and answers 500
        logger.warning("generation could not start (%s): %s: %s", endpoint.name, type(exc).__name__, exc)
        raise endpoint.unavailable() from None
    return events, first


async def _collect(
    request: Request, events: AsyncIterator[tuple[str, str | None, int]], first: tuple[str, str | None, int]
) -> tuple[str, str, int]:
    parts, (delta, finish, tokens) = [first[0]], first
    try:
        while finish is None:
            delta, finish, tokens = await anext(events)
            parts.append(delta)
    except ApiError:
        raise
    except Exception:
        logger.exception("generation failed")
        raise ApiError(ErrorType.SERVER, "the generation failed; see the server log") from None
    finally:
        # A stop string ends the events early: close them now, which frees the slot and cancels the rest.
        with anyio.CancelScope(shield=True):
            await events.aclose()
    request.state.tokens = request.state.tokens + tokens
    return "".join(parts), finish, tokens


async def _start_native(request: Request, model: type[GenerateRequest]):
    body = parse_body(model, await request.body())
    endpoint = gateway_of(request).pick(body.model, "generation")
    sampling = {"temperature": body.temperature or 0.0, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed}
    plan = await _plan(endpoint, body.prompt, body.max_new_tokens, "max_new_tokens", sampling, body.stop)
    events, first = await _start(request, endpoint, plan)
    return body, endpoint, len(plan.ids), events, first


async def generate(request: Request) -> Response:
    """POST /generate: {"prompt", "max_new_tokens"?, "temperature"?, "top_p"?, "top_k"?, "stop"?, "seed"?,
    "stream"?, "model"?}; greedy unless a temperature is given."""
    body, endpoint, prompt_tokens, events, first = await _start_native(request, GenerateRequest)
    if body.stream:
        def chunk(delta: str, finish: str | None, tokens: int) -> list[Any]:
            out: list[Any] = [{"text": delta}] if delta else []
            if finish is not None:
                out.append({"text": "", "finish_reason": finish, "usage": _usage(prompt_tokens, tokens)})
            return out

        return event_stream(request, events, first, chunk)
    text, finish, tokens = await _collect(request, events, first)
    return json_response({"model": endpoint.name, "text": text, "finish_reason": finish, "usage": _usage(prompt_tokens, tokens)})


async def generate_text(request: Request) -> Response:
    """POST /generate/stream: the body of /generate; the new text as plain text pieces as they come (what
    BentoML's clients read from a streaming method)."""
    _, _, _, events, first = await _start_native(request, GenerateTextRequest)
    return text_stream(request, events, first)


async def openai_completions(request: Request) -> Response:
    """POST /v1/completions in the OpenAI shape (one prompt, one choice), streaming too."""
    body = parse_body(CompletionRequest, await request.body())
    endpoint = gateway_of(request).pick(body.model, "generation")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(ErrorType.VALIDATION, "prompt: one prompt per request is served here", param="prompt")
        prompt = prompt[0]
    temperature = 1.0 if body.temperature is None else body.temperature  # the OpenAI default
    sampling = {"temperature": temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed}
    plan = await _plan(endpoint, prompt, body.max_tokens, "max_tokens", sampling, body.stop)
    events, first = await _start(request, endpoint, plan)
    prompt_tokens = len(plan.ids)
    head = {
        "id": f"cmpl-{request.scope.get('state', {}).get('request_id') or uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": endpoint.name,
    }
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(delta: str, finish: str | None, tokens: int) -> list[Any]:
            out: list[Any] = []
            if delta or finish is not None:
                choice = {"text": delta, "index": 0, "logprobs": None, "finish_reason": finish}
                out.append({**head, "choices": [choice]})
            if finish is not None and include_usage:
                out.append({**head, "choices": [], "usage": _usage(prompt_tokens, tokens)})
            return out

        return event_stream(request, events, first, chunk)
    text, finish, tokens = await _collect(request, events, first)
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return json_response({**head, "choices": [choice], "usage": _usage(prompt_tokens, tokens)})

"""Generation: `POST /generate` and the OpenAI shape, `POST /v1/completions`, whole or streamed.

The parts the chat route shares: a request becomes plans (one per prompt, each with `n` choices that decode
together), starts (capacity, then the token budget: the prompt and every new token it may generate), and
its choices' text arrives as pieces, whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
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

from bentoformers.api.schemas import CompletionRequest, GenerateRequest, GenerateTextRequest
from bentoformers.api.sse import event_stream, text_stream
from bentoformers.api.steps import account, chooser_of, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.endpoint import GeneratorEndpoint, unavailable_error
from bentoformers.runtime.generation import Sampling

logger = logging.getLogger("bentoformers.gateway")


MAX_STOPS = 4
MAX_PROMPTS = 16  # prompts per /v1/completions request


@dataclass
class _Plan:
    """A validated generation request for one prompt: its ids, token budget, sampling, stop strings, and its
    `n` choices, numbered from `first`."""

    ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stops: list[str]
    n: int = 1
    first: int = 0


@dataclass
class Piece:
    """New text of one choice; `finish` ("stop" | "length") on its last piece, `tokens`: its new tokens so far."""

    index: int
    text: str
    finish: str | None
    tokens: int


async def plan_generation(
    endpoint: GeneratorEndpoint, prompt: str | list[int], max_new_tokens: int | None, max_param: str,
    sampling: Sampling, stop: str | list[str] | None, n: int = 1, first: int = 0, param: str = "prompt",
) -> _Plan:
    """`prompt`: text, or token ids already checked against the context (a rendered chat)."""
    limit = endpoint.settings.max_new_tokens
    if max_new_tokens is not None and max_new_tokens > limit:
        raise ApiError(
            ErrorType.VALIDATION, f"{max_param} is {max_new_tokens}; this server allows at most {limit}", param=max_param
        )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(ErrorType.VALIDATION, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
    ids = await endpoint.prompt_ids(prompt, param) if isinstance(prompt, str) else prompt
    wanted = min(max_new_tokens or endpoint.settings.default_max_new_tokens, limit)
    # The context holds prompt and new tokens; past it the generation ends with finish_reason "length".
    return _Plan(ids, min(wanted, endpoint.card.max_length - len(ids)), sampling, stops, n, first)


async def _pieces(endpoint: GeneratorEndpoint, plan: _Plan, caller: str) -> AsyncIterator[Piece]:
    """The pieces of one prompt's choices, as their tokens arrive. Text that might begin a stop string is held
    back until it is known not to; a stop string ends its choice and is not returned."""
    hold = max((len(s) for s in plan.stops), default=1) - 1
    decoders = [endpoint.tokenizer.decode_stream() for _ in range(plan.n)]
    text, sent, tokens = [""] * plan.n, [0] * plan.n, [0] * plan.n
    open_choices = plan.n
    generation = endpoint.generate(plan.ids, plan.max_new_tokens, plan.sampling, plan.n, caller)
    async with aclosing(generation) as items:
        async for i, item in items:
            index = plan.first + i
            if isinstance(item, str):
                open_choices -= 1
                yield Piece(index, text[i][sent[i]:], item, tokens[i])
                continue
            tokens[i] += 1
            text[i] += decoders[i].step(item)
            found = [f for f in (text[i].find(s, max(0, sent[i] - hold)) for s in plan.stops) if f >= 0]
            if found:
                yield Piece(index, text[i][sent[i] : min(found)], "stop", tokens[i])
                open_choices -= 1
                if not open_choices:
                    return
                await items.asend(i)  # the other choices go on
                continue
            ready = len(text[i]) - hold
            if ready > sent[i]:
                yield Piece(index, text[i][sent[i]:ready], None, tokens[i])
                sent[i] = ready


async def _merged(sources: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """The pieces of several prompts as they come; closing it closes them all."""
    if len(sources) == 1:
        async with aclosing(sources[0]) as only:
            async for piece in only:
                yield piece
        return
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(source: AsyncIterator[Piece]) -> None:
        try:
            async with aclosing(source) as items:
                async for piece in items:
                    queue.put_nowait(piece)
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(s)) for s in sources]
    try:
        for _ in sources:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class StreamUsage:
    """The usage chunk that ends an OpenAI stream with stream_options.include_usage: the completion tokens
    are counted as the choices finish, and the chunk goes out after the last."""

    def __init__(self, head: dict[str, Any], prompt_tokens: int, choices: int, wanted: bool) -> None:
        self.head, self.prompt_tokens, self.open, self.wanted = head, prompt_tokens, choices, wanted
        self.tokens = 0

    def finished(self, piece: Piece) -> list[dict[str, Any]]:
        """After a choice's last piece: [the usage chunk] once every choice has finished, else []."""
        self.tokens += piece.tokens
        self.open -= 1
        if self.wanted and not self.open:
            return [{**self.head, "choices": [], "usage": usage(self.prompt_tokens, self.tokens)}]
        return []


async def start_generation(request: Request, endpoint: GeneratorEndpoint, plans: list[_Plan]) -> tuple[AsyncIterator[Piece], Piece]:
    """Starts the generation and waits for its first piece, so a failure to start is still a plain HTTP error.

    Charges the prompt tokens and every new token the request may generate (each choice's `max_tokens`): a
    generation can never cost more than the caller's budget held when it started."""
    # Before the tokens are charged: a refused request costs nothing.
    sequences = sum(p.n for p in plans)
    caller = caller_of(request)
    endpoint.reserve_generations(sequences, caller, param="prompt" if len(plans) > 1 else "n")
    try:
        await account(request, endpoint, sum(len(p.ids) for p in plans), sum(p.n * p.max_new_tokens for p in plans))
    except BaseException:
        endpoint.release_generations(sequences, caller)
        raise
    events = _released(endpoint, sequences, caller, _merged([_pieces(endpoint, p, caller) for p in plans]))
    try:
        first = await anext(events)  # a failure here has run _released's finally
    except ApiError:
        raise
    except Exception as exc:
        if not unavailable_error(exc):
            raise  # a bug: the app's handler logs it with its traceback and answers 500
        logger.warning("generation could not start (%s): %s: %s", endpoint.name, type(exc).__name__, exc)
        raise endpoint.unavailable() from None
    return events, first


async def _released(
    endpoint: GeneratorEndpoint, sequences: int, caller: str, events: AsyncIterator[Piece]
) -> AsyncIterator[Piece]:
    """`events`, and the reserved sequences released when they end, fail or are closed."""
    try:
        async with aclosing(events):
            async for piece in events:
                yield piece
    finally:
        endpoint.release_generations(sequences, caller)


def caller_of(request: Request) -> str:
    """Who is generating, for the per-caller bounds and the model service's round-robin: the identity's name
    (a key's id, a JWT subject, an anonymous client's address), never a secret."""
    identity = request.scope.get("state", {}).get("identity")
    return identity.name if identity is not None else ""


async def collect_generation(request: Request, events: AsyncIterator[Piece], first: Piece) -> dict[int, Piece]:
    """Every choice whole: index -> its text, finish reason and new tokens."""
    whole: dict[int, Piece] = {}
    piece: Piece | None = first
    try:
        while piece is not None:
            got = whole.setdefault(piece.index, Piece(piece.index, "", None, 0))
            got.text, got.finish, got.tokens = got.text + piece.text, piece.finish, piece.tokens
            piece = await anext(events, None)
    except ApiError:
        raise
    except Exception:
        logger.exception("generation failed")
        raise ApiError(ErrorType.SERVER, "the generation failed; see the server log") from None
    finally:
        # A stop string ends the events early: close them now, which frees the slots and cancels the rest.
        with anyio.CancelScope(shield=True):
            await events.aclose()
    request.state.tokens = request.state.tokens + sum(p.tokens for p in whole.values())
    return dict(sorted(whole.items()))


def seeded(seed: int | None, offset: int) -> int | None:
    """Prompt k's choices sample with seed + k·n + i (the model service adds i): reproducible, and distinct."""
    return None if seed is None else seed + offset


async def _start_native(request: Request, model: type[GenerateRequest]):
    body = parse_body(model, await request.body())
    endpoint = chooser_of(request).pick(body.model, "generation")
    sampling = Sampling(body.temperature or 0.0, body.top_p, body.top_k, body.seed)
    plan = await plan_generation(endpoint, body.prompt, body.max_new_tokens, "max_new_tokens", sampling, body.stop)
    events, first = await start_generation(request, endpoint, [plan])
    return body, endpoint, len(plan.ids), events, first


async def generate(request: Request) -> Response:
    """POST /generate: {"prompt", "max_new_tokens"?, "temperature"?, "top_p"?, "top_k"?, "stop"?, "seed"?,
    "stream"?, "model"?}; greedy unless a temperature is given."""
    body, endpoint, prompt_tokens, events, first = await _start_native(request, GenerateRequest)
    if body.stream:
        def chunk(piece: Piece) -> list[Any]:
            out: list[Any] = [{"text": piece.text}] if piece.text else []
            if piece.finish is not None:
                out.append({"text": "", "finish_reason": piece.finish, "usage": usage(prompt_tokens, piece.tokens)})
            return out

        return event_stream(request, events, first, chunk)
    (whole,) = (await collect_generation(request, events, first)).values()
    return json_response(
        {"model": endpoint.name, "text": whole.text, "finish_reason": whole.finish, "usage": usage(prompt_tokens, whole.tokens)}
    )


def openai_head(request: Request, prefix: str, kind: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{request.scope.get('state', {}).get('request_id') or uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


async def generate_text(request: Request) -> Response:
    """POST /generate/stream: the body of /generate; the new text as plain text pieces as they come (what
    BentoML's clients read from a streaming method)."""
    _, _, _, events, first = await _start_native(request, GenerateTextRequest)
    return text_stream(request, events, first)


async def openai_completions(request: Request) -> Response:
    """POST /v1/completions in the OpenAI shape: a prompt or a list of them, `n` choices each (choice
    k·n + i is prompt k's i-th), streaming too."""
    body = parse_body(CompletionRequest, await request.body())
    endpoint = chooser_of(request).pick(body.model, "generation")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise ApiError(ErrorType.VALIDATION, f"prompt: 1 to {MAX_PROMPTS} prompts per request", param="prompt")
    temperature = 1.0 if body.temperature is None else body.temperature  # the OpenAI default
    plans = []
    for k, prompt in enumerate(prompts):
        sampling = Sampling(temperature, body.top_p, body.top_k, seeded(body.seed, k * body.n))
        param = "prompt" if isinstance(body.prompt, str) else f"prompt.{k}"
        plans.append(await plan_generation(endpoint, prompt, body.max_tokens, "max_tokens", sampling, body.stop, body.n,
                                 k * body.n, param))
    events, first = await start_generation(request, endpoint, plans)
    prompt_tokens = sum(len(p.ids) for p in plans)
    head = openai_head(request, "cmpl", "text_completion", endpoint.name)
    if body.stream:
        tally = StreamUsage(head, prompt_tokens, len(plans) * body.n,
                            body.stream_options is not None and body.stream_options.include_usage)

        def chunk(piece: Piece) -> list[Any]:
            out: list[Any] = []
            if piece.text or piece.finish is not None:
                choice = {"text": piece.text, "index": piece.index, "logprobs": None, "finish_reason": piece.finish}
                out.append({**head, "choices": [choice]})
            if piece.finish is not None:
                out += tally.finished(piece)
            return out

        return event_stream(request, events, first, chunk)
    whole = await collect_generation(request, events, first)
    choices = [{"text": p.text, "index": i, "logprobs": None, "finish_reason": p.finish} for i, p in whole.items()]
    return json_response(
        {**head, "choices": choices, "usage": usage(prompt_tokens, sum(p.tokens for p in whole.values()))}
    )

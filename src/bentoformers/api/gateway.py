"""The public routes: model choice, validation, tokenization, the API shapes. Encoder work goes through the Coalescer."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.api.routes import ROUTES
from bentoformers.api.schemas import (
    ClassifyRequest,
    CompletionRequest,
    EmbedRequest,
    GenerateRequest,
    OpenAIEmbeddingRequest,
)
from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.observability import metrics
from bentoformers.runtime.engine import (
    InputTooLong,
    ModelCard,
    TextTokenizer,
    l2_normalize,
    label_scores,
)
from bentoformers.security.ratelimit import charge_tokens
from bentoformers.serving.batcher import Coalescer
from bentoformers.settings import Settings

logger = logging.getLogger("bentoformers.api.gateway")
M = TypeVar("M", bound=BaseModel)
INLINE_TOKENIZE_CHARS = 20_000  # above this, tokenize in a thread so the event loop stays free


class ModelEndpoint:
    """One served model as the gateway sees it: its card and tokenizer, limits, and its model service."""

    def __init__(
        self,
        settings: Settings,
        model_folder: str | Path,
        describe: Callable[[], Awaitable[dict[str, Any]]],
        call: Callable[[list[list[int]]], Awaitable[np.ndarray]] | None = None,
        stream: Callable[..., AsyncIterator[str]] | None = None,
        cancel: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.settings = settings
        self.card = ModelCard.load(model_folder)
        self.name, self.task = self.card.name, self.card.task
        self.tokenizer = TextTokenizer(model_folder, self.card.max_length)
        self.coalescer = None
        if call is not None:
            self.coalescer = Coalescer(
                call,
                max_items=settings.max_batch_items,
                max_tokens=settings.max_batch_tokens,
                max_queued=settings.max_queued_items,
                retry_after=settings.retry_after_seconds,
                model=self.name,
            )
        self._stream = stream
        self._cancel = cancel
        self.generating = 0  # requests in flight to the model service (generation)
        self._describe = describe
        self._served: dict[str, Any] | None = None
        self.created = int(time.time())

    async def tokenize(self, texts: list[str], truncate: bool, param: str) -> list[list[int]]:
        self._check_texts(texts, param)
        try:
            if sum(map(len, texts)) > INLINE_TOKENIZE_CHARS:
                return await asyncio.to_thread(self.tokenizer.encode, texts, truncate)
            return self.tokenizer.encode(texts, truncate)
        except InputTooLong as exc:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param}[{exc.index}] has {exc.tokens} tokens, over the model's limit of {exc.limit}; "
                "shorten it or send truncate: true",
                param=f"{param}.{exc.index}",
            ) from None

    async def infer(self, ids: list[list[int]]) -> np.ndarray:
        """One row per sequence from the model service (embeddings or logits), batched with other requests."""
        assert self.coalescer is not None
        try:
            return await self.coalescer.submit(ids)
        except ApiError:
            raise
        except Exception as exc:
            # An honest 503, quietly: the model service logs its own failures, and a traceback per shed
            # request (BentoML's batcher under load) would bury everything else.
            logger.warning("model service call failed (%s): %s: %s", self.name, type(exc).__name__, exc)
            raise self.unavailable() from None

    async def prompt_ids(self, prompt: str, param: str) -> list[int]:
        if not prompt.strip():
            raise ApiError(ErrorType.VALIDATION, f"{param} is empty", param=param)
        if len(prompt) > self.settings.max_chars_per_item:
            raise ApiError(
                ErrorType.TOO_LARGE, f"{param} has {len(prompt)} characters; at most {self.settings.max_chars_per_item}",
                param=param,
            )
        if len(prompt) > INLINE_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(self.tokenizer.ids, prompt)
        else:
            ids = self.tokenizer.ids(prompt)
        if len(ids) >= self.card.max_length:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param} has {len(ids)} tokens; the model's context is {self.card.max_length} tokens, "
                "prompt and new tokens together",
                param=param,
            )
        return ids

    def check_generation_capacity(self) -> None:
        limit = self.settings.max_active_sequences + self.settings.max_waiting_sequences
        if self.generating >= limit:
            raise ApiError(
                ErrorType.OVERLOADED,
                f"the server is at capacity ({self.generating} generations in flight); "
                f"retry after {self.settings.retry_after_seconds}s",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )

    async def generate(self, prompt: list[int], max_new_tokens: int, sampling: dict[str, Any]) -> AsyncIterator[int | str]:
        """New token ids from the model service, then the finish reason ("stop" or "length")."""
        assert self._stream is not None
        self.check_generation_capacity()
        self.generating += 1
        key = uuid.uuid4().hex
        lines = self._stream(
            prompt, max_new_tokens, sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling["seed"], key
        )
        buffer, finished = "", False
        try:
            async for chunk in lines:
                buffer += chunk
                *complete, buffer = buffer.split("\n")
                for line in complete:
                    if line.isdigit():
                        yield int(line)
                    elif line.startswith("error"):
                        raise RuntimeError(f"model service: {line}")
                    else:
                        finished = True
                        yield line
                        return
            raise RuntimeError("the model service ended the stream without a finish reason")
        finally:
            self.generating -= 1
            # Stopped early (a stop string, a client gone, an error): tell the model service to stop too.
            # Closing the stream alone does not reach it in time across processes. Shielded: this often
            # runs while the request's task is being cancelled.
            with anyio.CancelScope(shield=True):
                await lines.aclose()
                if not finished and self._cancel is not None:
                    try:
                        with anyio.fail_after(5):
                            await self._cancel(key)
                    except Exception:
                        logger.warning("could not cancel a generation in %s", self.name, exc_info=True)  # stops the generation in the model service when we stop early

    def unavailable(self) -> ApiError:
        return ApiError(
            ErrorType.OVERLOADED,
            "the model service is unavailable; retry shortly",
            headers={"Retry-After": str(self.settings.retry_after_seconds)},
        )

    def _check_texts(self, texts: list[str], param: str) -> None:
        limits = self.settings
        if not texts:
            raise ApiError(ErrorType.VALIDATION, f"{param} must hold at least one text", param=param)
        if len(texts) > limits.max_items_per_request:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param} holds {len(texts)} texts; at most {limits.max_items_per_request} per request",
                param=param,
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(ErrorType.VALIDATION, f"{param}[{i}] is empty", param=f"{param}.{i}")
            if len(text) > limits.max_chars_per_item:
                raise ApiError(
                    ErrorType.TOO_LARGE,
                    f"{param}[{i}] has {len(text)} characters; at most {limits.max_chars_per_item}",
                    param=f"{param}.{i}",
                )

    async def served(self) -> dict[str, Any]:
        """Precision and device, as the model service reports them (asked once)."""
        if self._served is None:
            self._served = await self._describe()
        return self._served

    async def describe(self) -> dict[str, Any]:
        try:
            served = await self.served()
        except Exception:
            logger.exception("model service describe failed (%s)", self.name)
            served = {}
        card = self.card
        entry: dict[str, Any] = {
            "id": card.name,
            "object": "model",
            "created": self.created,
            "owned_by": "bentoformers",
            "task": card.task,
            "precision": served.get("precision"),
            "device": served.get("device"),
            # The start-up check on the serving CPU, and any variant it refused (then a fallback serves).
            "cpu": served.get("cpu"),
            "selfcheck": served.get("selfcheck"),
            "refused_variants": served.get("refused", []),
        }
        if card.task == "embeddings":
            entry |= {"dimensions": card.dimensions, "max_input_tokens": card.max_length}
        elif card.task == "classification":
            entry |= {"labels": list(card.labels), "multi_label": card.multi_label, "max_input_tokens": card.max_length}
        if card.task != "generation":
            entry["max_items_per_request"] = self.settings.max_items_per_request
        else:
            entry |= {"context_length": card.max_length, "max_new_tokens": self.settings.max_new_tokens}
        return entry


class Gateway:
    """The served models by name; picks the one a request asks for, checking it serves the route's task."""

    def __init__(self, settings: Settings, endpoints: list[ModelEndpoint]) -> None:
        self.settings = settings
        self.models = {e.name: e for e in endpoints}
        if settings.default_model and settings.default_model not in self.models:
            raise RuntimeError(f"default_model {settings.default_model!r} is not served; served: {', '.join(self.models)}")

    def pick(self, requested: str | None, task: str) -> ModelEndpoint:
        if requested is None:
            default = self.models.get(self.settings.default_model)
            if default is not None and default.task == task:
                return default
            for endpoint in self.models.values():
                if endpoint.task == task:
                    return endpoint
            raise ApiError(ErrorType.NOT_FOUND, f"no {task} model is served here; served: {self._listing()}", param="model")
        endpoint = self.models.get(requested)
        if endpoint is None:
            raise ApiError(
                ErrorType.NOT_FOUND, f"model {requested!r} is not served here; available: {self._listing()}", param="model"
            )
        if endpoint.task != task:
            raise ApiError(
                ErrorType.INVALID_REQUEST,
                f"model {requested!r} is a {endpoint.task} model; this route needs a {task} model "
                f"(served: {self._listing()})",
                param="model",
            )
        return endpoint

    def _listing(self) -> str:
        return ", ".join(f"{e.name} ({e.task})" for e in self.models.values())


def _parse(model: type[M], body: bytes) -> M:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorType.INVALID_REQUEST, f"the request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # With `str | list[str]` pydantic reports both branches; the deepest location is the useful one.
        first = max(exc.errors(include_url=False, include_input=False), key=lambda e: len(e["loc"]))
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("list[", "str")))
        raise ApiError(ErrorType.VALIDATION, f"{loc or 'body'}: {first['msg']}", param=loc or None) from None


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _account(request: Request, endpoint: ModelEndpoint, tokens: int) -> None:
    """After tokenizing, before the model call: the caller's token budget (429 when over it), the model and
    tokens for the access log, the token metric. Every model route calls it."""
    request.state.model = endpoint.name
    await charge_tokens(request, tokens)
    request.state.tokens = tokens
    metrics.tokens.labels(endpoint.name, endpoint.task).inc(tokens)


async def embed(request: Request) -> Response:
    """POST /embed: {"inputs": str | [str], "normalize"?, "truncate"?, "model"?}."""
    body = _parse(EmbedRequest, await request.body())
    endpoint = _gateway(request).pick(body.model, "embeddings")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    vectors, tokens = await _embed(request, endpoint, texts, body.truncate, body.normalize, "inputs")
    return _json({
        "model": endpoint.name,
        "embeddings": vectors,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def _embed(
    request: Request, endpoint: ModelEndpoint, texts: list[str], truncate: bool, normalize: bool | None, param: str
) -> tuple[np.ndarray, int]:
    ids = await endpoint.tokenize(texts, truncate, param)
    tokens = sum(map(len, ids))
    await _account(request, endpoint, tokens)
    vectors = await endpoint.infer(ids)
    if endpoint.card.normalize if normalize is None else normalize:
        vectors = l2_normalize(vectors)
    return vectors, tokens


async def openai_embeddings(request: Request) -> Response:
    """POST /v1/embeddings in the OpenAI shape."""
    body = _parse(OpenAIEmbeddingRequest, await request.body())
    endpoint = _gateway(request).pick(body.model, "embeddings")
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
    return _json({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": endpoint.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def classify(request: Request) -> Response:
    """POST /classify: {"inputs": str | [str], "top_k"?: int | null (all), "truncate"?, "model"?}."""
    body = _parse(ClassifyRequest, await request.body())
    endpoint = _gateway(request).pick(body.model, "classification")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    ids = await endpoint.tokenize(texts, body.truncate, "inputs")
    tokens = sum(map(len, ids))
    await _account(request, endpoint, tokens)
    scores = label_scores(await endpoint.infer(ids), endpoint.card.multi_label)
    labels = endpoint.card.labels
    top_k = len(labels) if body.top_k is None else min(body.top_k, len(labels))
    results = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:top_k]
        results.append([{"label": labels[i], "score": float(row[i])} for i in order])
    return _json({"model": endpoint.name, "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


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
    await _account(request, endpoint, len(plan.ids))
    events = _text_events(endpoint, plan)
    try:
        first = await anext(events)
    except ApiError:
        raise
    except Exception:
        logger.exception("generation failed to start (%s)", endpoint.name)
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


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def _event_stream(
    request: Request,
    events: AsyncIterator[tuple[str, str | None, int]],
    first: tuple[str, str | None, int],
    chunk: Callable[[str, str | None, int], list[Any]],
) -> StreamingResponse:
    """Server-sent events: chunk(text, finish, tokens) gives the data of each event; then [DONE]."""

    async def body() -> AsyncIterator[bytes]:
        delta, finish, tokens = first
        try:
            while True:
                for data in chunk(delta, finish, tokens):
                    yield _sse(data)
                if finish is not None:
                    break
                delta, finish, tokens = await anext(events)
            request.state.tokens = request.state.tokens + tokens
            yield _sse(b"[DONE]")
        except Exception as exc:  # the status line has gone out: the error travels as an event
            logger.exception("generation failed mid-stream")
            kind = exc.kind if isinstance(exc, ApiError) else ErrorType.SERVER
            yield _sse({"error": {"type": str(kind), "message": "the generation failed; see the server log", "param": None}})
        finally:
            # A client that went away stops its generation; the response task is being cancelled then,
            # so the cleanup must be shielded to run at all.
            with anyio.CancelScope(shield=True):
                await events.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def generate(request: Request) -> Response:
    """POST /generate: {"prompt", "max_new_tokens"?, "temperature"?, "top_p"?, "top_k"?, "stop"?, "seed"?,
    "stream"?, "model"?}; greedy unless a temperature is given."""
    body = _parse(GenerateRequest, await request.body())
    endpoint = _gateway(request).pick(body.model, "generation")
    sampling = {"temperature": body.temperature or 0.0, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed}
    plan = await _plan(endpoint, body.prompt, body.max_new_tokens, "max_new_tokens", sampling, body.stop)
    events, first = await _start(request, endpoint, plan)
    prompt_tokens = len(plan.ids)
    if body.stream:
        def chunk(delta: str, finish: str | None, tokens: int) -> list[Any]:
            out: list[Any] = [{"text": delta}] if delta else []
            if finish is not None:
                out.append({"text": "", "finish_reason": finish, "usage": _usage(prompt_tokens, tokens)})
            return out

        return _event_stream(request, events, first, chunk)
    text, finish, tokens = await _collect(request, events, first)
    return _json({"model": endpoint.name, "text": text, "finish_reason": finish, "usage": _usage(prompt_tokens, tokens)})


async def openai_completions(request: Request) -> Response:
    """POST /v1/completions in the OpenAI shape (one prompt, one choice), streaming too."""
    body = _parse(CompletionRequest, await request.body())
    endpoint = _gateway(request).pick(body.model, "generation")
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

        return _event_stream(request, events, first, chunk)
    text, finish, tokens = await _collect(request, events, first)
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return _json({**head, "choices": [choice], "usage": _usage(prompt_tokens, tokens)})


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    data = await asyncio.gather(*(e.describe() for e in gw.models.values()))
    return _json({"object": "list", "data": list(data)})


async def not_found(request: Request) -> Response:
    raise ApiError(ErrorType.NOT_FOUND, f"no route {request.method} {request.url.path}")


def _with_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)
        except Exception:
            logger.exception("unhandled error on %s", request.url.path)
            return error_response(ApiError(ErrorType.SERVER, "internal error; see the server log"))

    return wrapped


class _Fallback(Route):
    """Answers unknown paths with the one error body, leaving BentoML's own pages (/, /docs.json) alone."""

    BENTOML_PAGES = ("/", "/docs.json", "/schema.json")
    BENTOML_PREFIXES = ("/static_content/", "/assets/")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if path in self.BENTOML_PAGES or path.startswith(self.BENTOML_PREFIXES):
            return Match.NONE, {}
        return super().matches(scope)


HANDLERS = {f.__name__: f for f in (embed, openai_embeddings, classify, generate, openai_completions, list_models)}


def create_app() -> Starlette:
    """The routes of the route table (routes.py), then one error body for every other path."""
    routes = [Route(r.path, _with_errors(HANDLERS[r.handler]), methods=[r.method]) for r in ROUTES]
    routes.append(
        _Fallback("/{path:path}", _with_errors(not_found), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    )
    return Starlette(routes=routes)


class RequestIdMiddleware:
    """Echoes a sane X-Request-ID from the client, or makes one; every response carries it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if 0 < len(candidate) <= 128 and candidate.isprintable():
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)

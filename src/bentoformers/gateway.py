"""The public routes: validation, tokenization, the API shapes. Model work goes through the Coalescer."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .batcher import Coalescer
from .engine import InputTooLong, ModelCard, TextTokenizer, l2_normalize
from .errors import ApiError, ErrorType, error_response
from .ratelimit import charge_tokens
from .schemas import EmbedRequest, OpenAIEmbeddingRequest
from .settings import Settings

logger = logging.getLogger("bentoformers.gateway")
M = TypeVar("M", bound=BaseModel)
INLINE_TOKENIZE_CHARS = 20_000  # above this, tokenize in a thread so the event loop stays free


class Gateway:
    """One served embedding model as the gateway sees it: limits, tokenizer, batched model calls."""

    def __init__(
        self,
        settings: Settings,
        model_folder: str | Path,
        call: Callable[[list[list[int]]], Awaitable[np.ndarray]],
        describe: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.settings = settings
        self.card = ModelCard.load(model_folder)
        self.tokenizer = TextTokenizer(model_folder, self.card.max_length)
        self.coalescer = Coalescer(
            call,
            max_items=settings.max_batch_items,
            max_tokens=settings.max_batch_tokens,
            max_queued=settings.max_queued_items,
            retry_after=settings.retry_after_seconds,
            model=self.card.name,
        )
        self._describe = describe
        self._served: dict[str, Any] | None = None
        self.created = int(time.time())

    async def embed(
        self,
        texts: list[str],
        truncate: bool,
        normalize: bool | None,
        param: str,
        charge: Callable[[int], Awaitable[None]] | None = None,
    ) -> tuple[np.ndarray, int]:
        self._check_texts(texts, param)
        try:
            if sum(map(len, texts)) > INLINE_TOKENIZE_CHARS:
                ids = await asyncio.to_thread(self.tokenizer.encode, texts, truncate)
            else:
                ids = self.tokenizer.encode(texts, truncate)
        except InputTooLong as exc:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param}[{exc.index}] has {exc.tokens} tokens, over the model's limit of {exc.limit}; "
                "shorten it or send truncate: true",
                param=f"{param}.{exc.index}",
            ) from None
        if charge is not None:  # the caller's token budget, before any model work
            await charge(sum(map(len, ids)))
        try:
            vectors = await self.coalescer.submit(ids)
        except ApiError:
            raise
        except Exception as exc:
            # An honest 503, quietly: the model service logs its own failures, and a traceback per shed
            # request (BentoML's batcher under load) would bury everything else.
            logger.warning("model service call failed: %s: %s", type(exc).__name__, exc)
            raise ApiError(
                ErrorType.OVERLOADED,
                "the model service is unavailable; retry shortly",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            ) from None
        if self.card.normalize if normalize is None else normalize:
            vectors = l2_normalize(vectors)
        tokens = sum(map(len, ids))
        metrics.tokens.labels(self.card.name, self.card.task).inc(tokens)
        return vectors, tokens

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.card.name:
            raise ApiError(
                ErrorType.NOT_FOUND,
                f"model {requested!r} is not served here; available: {self.card.name}",
                param="model",
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
        if self._served is None:
            self._served = await self._describe()
        return self._served


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


async def embed(request: Request) -> Response:
    """POST /embed: {"inputs": str | [str], "normalize"?, "truncate"?, "model"?}."""
    gw = _gateway(request)
    body = _parse(EmbedRequest, await request.body())
    gw.check_model(body.model)
    request.state.model = gw.card.name
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    vectors, tokens = await gw.embed(texts, body.truncate, body.normalize, "inputs", partial(charge_tokens, request))
    request.state.tokens = tokens
    return _json({
        "model": gw.card.name,
        "embeddings": vectors,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def openai_embeddings(request: Request) -> Response:
    """POST /v1/embeddings in the OpenAI shape."""
    gw = _gateway(request)
    body = _parse(OpenAIEmbeddingRequest, await request.body())
    gw.check_model(body.model)
    request.state.model = gw.card.name
    if body.dimensions is not None and body.dimensions != gw.card.dimensions:
        raise ApiError(
            ErrorType.VALIDATION,
            f"{gw.card.name} gives {gw.card.dimensions} dimensions; it cannot give {body.dimensions}",
            param="dimensions",
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors, tokens = await gw.embed(texts, body.truncate, None, "input", partial(charge_tokens, request))
    request.state.tokens = tokens
    if body.encoding_format == "base64":
        items = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        items = list(vectors)
    return _json({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": gw.card.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    try:
        served = await gw.served()
    except Exception:
        logger.exception("model service describe failed")
        served = {}
    card = gw.card
    return _json({
        "object": "list",
        "data": [{
            "id": card.name,
            "object": "model",
            "created": gw.created,
            "owned_by": "bentoformers",
            "task": card.task,
            "dimensions": card.dimensions,
            "max_input_tokens": card.max_length,
            "precision": served.get("precision"),
            "device": served.get("device"),
            "max_items_per_request": gw.settings.max_items_per_request,
        }],
    })


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


def create_app() -> Starlette:
    routes = [
        Route("/embed", _with_errors(embed), methods=["POST"]),
        Route("/v1/embeddings", _with_errors(openai_embeddings), methods=["POST"]),
        Route("/v1/models", _with_errors(list_models), methods=["GET"]),
        _Fallback("/{path:path}", _with_errors(not_found), methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
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

"""What every route does with a body: parse it, answer JSON, charge and count its tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.chooser import ModelChooser
from bentoformers.gateway.endpoint import EncoderEndpoint, ModelEndpoint
from bentoformers.observability import metrics
from bentoformers.security.ratelimit import charge_tokens

M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: bytes, refuse: Callable[[Any], None] | None = None) -> M:
    """The body as `model`. `refuse` first sees the parsed JSON, to name fields this server cannot honour
    (a 400) before validation would report them another way."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorType.INVALID_REQUEST, f"the request body is not valid JSON: {exc}") from None
    if refuse is not None:
        refuse(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Few errors to build: every list of a request stops at its first wrong item (schemas.bounded). With
        # `str | list[str]` pydantic reports both branches; the deepest location is the useful one, and at one
        # depth an error other than a wrong type (the branch not taken), such as a list too long.
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("list[", "str")))
        raise ApiError(ErrorType.VALIDATION, f"{loc or 'body'}: {first['msg']}", param=loc or None) from None


def json_response(data: Any) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def chooser_of(request: Request) -> ModelChooser:
    return request.app.state.chooser


async def infer_charged(request: Request, endpoint: EncoderEndpoint, ids: list[list[int]]) -> tuple[Any, int]:
    """The shared last steps of every encoder route: charge the tokens (account), then the batched model call.
    Returns the rows and the token count."""
    tokens = sum(map(len, ids))
    request.state.items = len(ids)
    await account(request, endpoint, tokens)
    return await endpoint.infer(ids), tokens


async def account(request: Request, endpoint: ModelEndpoint, tokens: int, reserve: int = 0) -> None:
    """After tokenizing, before the model call: the caller's token budget (429 when over it), the model and
    tokens for the access log, the token metric. Every model route calls it. Generation also charges
    `reserve`, the new tokens it may generate (security/ratelimit.py)."""
    request.state.model, request.state.task = endpoint.name, endpoint.task
    what = f"tokens: {tokens} in the prompt and up to {reserve} new" if reserve else "input tokens"
    await charge_tokens(request, tokens + reserve, what)
    request.state.tokens = tokens
    metrics.tokens.labels(endpoint.name, endpoint.task).inc(tokens)

"""Model choice for a request, and what every route does with a body: parse it, answer JSON, count its tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.endpoint import ModelEndpoint
from bentoformers.errors import ApiError, ErrorType
from bentoformers.observability import metrics
from bentoformers.security.ratelimit import charge_tokens
from bentoformers.settings import Settings

M = TypeVar("M", bound=BaseModel)


class Gateway:
    """The served models by name; picks the one a request asks for, checking it serves the route's task."""

    def __init__(self, settings: Settings, endpoints: list[ModelEndpoint]) -> None:
        self.settings = settings
        self.models = {e.name: e for e in endpoints}
        if settings.default_model and settings.default_model not in self.models:
            raise RuntimeError(f"default_model {settings.default_model!r} is not served; served: {', '.join(self.models)}")

    async def ready(self) -> bool:
        """Every model service answered its last health call (serving/health.py). Waits only for a first call,
        bounded by its timeout: it never waits on a model service after that."""
        for endpoint in self.models.values():
            endpoint.health.watch()
        for endpoint in self.models.values():
            if endpoint.health.state == "unknown":
                await endpoint.health.first_decided()
        return all(e.health.state == "up" for e in self.models.values())

    def pick(self, requested: str | None, task: str) -> ModelEndpoint:
        endpoint = self._pick(requested, task)
        endpoint.health.watch()
        return endpoint

    def pick_any(self, requested: str | None) -> ModelEndpoint:
        """The model a request names, whatever its task; absent: the default model, else the first served."""
        if requested is None:
            return self.models.get(self.settings.default_model) or next(iter(self.models.values()))
        if requested not in self.models:
            raise ApiError(
                ErrorType.NOT_FOUND, f"model {requested!r} is not served here; available: {self._listing()}", param="model"
            )
        return self.models[requested]

    def _pick(self, requested: str | None, task: str) -> ModelEndpoint:
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
        # With `str | list[str]` pydantic reports both branches; the deepest location is the useful one.
        first = max(exc.errors(include_url=False, include_input=False), key=lambda e: len(e["loc"]))
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("list[", "str")))
        raise ApiError(ErrorType.VALIDATION, f"{loc or 'body'}: {first['msg']}", param=loc or None) from None


def json_response(data: Any) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


async def infer_charged(request: Request, endpoint: ModelEndpoint, ids: list[list[int]]) -> tuple[Any, int]:
    """The shared last steps of every encoder route: charge the tokens (account), then the batched model call.
    Returns the rows and the token count."""
    tokens = sum(map(len, ids))
    await account(request, endpoint, tokens)
    return await endpoint.infer(ids), tokens


async def account(request: Request, endpoint: ModelEndpoint, tokens: int, reserve: int = 0) -> None:
    """After tokenizing, before the model call: the caller's token budget (429 when over it), the model and
    tokens for the access log, the token metric. Every model route calls it. Generation also charges
    `reserve`, the new tokens it may generate (security/ratelimit.py)."""
    request.state.model = endpoint.name
    what = f"tokens: {tokens} in the prompt and up to {reserve} new" if reserve else "input tokens"
    await charge_tokens(request, tokens + reserve, what)
    request.state.tokens = tokens
    metrics.tokens.labels(endpoint.name, endpoint.task).inc(tokens)

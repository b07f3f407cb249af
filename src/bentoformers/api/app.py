"""The Starlette app: the route table's routes, `GET /v1/models`, and one error body for everything else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from bentoformers.api.chat import chat_completions
from bentoformers.api.classification import classify
from bentoformers.api.embeddings import embed, openai_embeddings
from bentoformers.api.gateway import gateway_of, json_response
from bentoformers.api.generation import generate, openai_completions
from bentoformers.api.routes import ROUTES
from bentoformers.errors import ApiError, ErrorType, error_response

logger = logging.getLogger("bentoformers.gateway")


async def list_models(request: Request) -> Response:
    gw = gateway_of(request)
    data = await asyncio.gather(*(e.describe() for e in gw.models.values()))
    return json_response({"object": "list", "data": list(data)})


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


HANDLERS = {
    f.__name__: f
    for f in (embed, openai_embeddings, classify, generate, openai_completions, chat_completions, list_models)
}


def create_app() -> Starlette:
    """The routes of the route table (routes.py), then one error body for every other path."""
    routes = [Route(r.path, _with_errors(HANDLERS[r.handler]), methods=[r.method]) for r in ROUTES]
    routes.append(
        _Fallback("/{path:path}", _with_errors(not_found), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    )
    return Starlette(routes=routes)

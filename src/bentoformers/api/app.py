"""The Starlette app: the route table's routes, the API's description, and one error body for everything else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from bentoformers.api.chat import chat_completions
from bentoformers.api.classification import classify
from bentoformers.api.embeddings import cohere_embed, embed, openai_embeddings
from bentoformers.api.generation import generate, generate_text, openai_completions
from bentoformers.api.openapi import DOCS_PAGE, SWAGGER_UI, openapi_document
from bentoformers.api.rerank import rerank, rerank_v1, rerank_v2
from bentoformers.api.sparse import embed_sparse
from bentoformers.api.routes import ROUTES
from bentoformers.api.steps import chooser_of, json_response
from bentoformers.api.token_classification import ner
from bentoformers.api.tokenize import tokenize
from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.observability import scrape

logger = logging.getLogger("bentoformers.gateway")


async def list_models(request: Request) -> Response:
    gw = chooser_of(request)
    data = await asyncio.gather(*(e.describe() for e in gw.models.values()))
    return json_response({"object": "list", "data": list(data)})


async def metrics_page(request: Request) -> Response:
    return Response(await request.app.state.metrics_page.get(), media_type=scrape.CONTENT_TYPE_LATEST)


async def not_found(request: Request) -> Response:
    raise ApiError(ErrorType.NOT_FOUND, f"no route {request.method} {request.url.path}")


def _json_body(request: Request) -> None:
    """A body must be declared JSON (`application/json`, or a `+json` type), before it is read."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise ApiError(
            ErrorType.UNSUPPORTED_MEDIA_TYPE,
            f"the body must be JSON, sent with Content-Type: application/json (got {media_type or 'none'!r})",
        )


def _with_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            if request.method == "POST" and handler is not not_found:
                _json_body(request)
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


HANDLERS = {f.__name__: f for f in (
    embed, openai_embeddings, cohere_embed, tokenize, classify, generate, generate_text, openai_completions, chat_completions,
    list_models, rerank, rerank_v1, rerank_v2, ner, embed_sparse,
)}


def _document_routes(secured: bool, served: dict[str, str] | None) -> list[Route]:
    """/openapi.json, and /docs rendering it with the Swagger UI files that BentoML ships (no CDN)."""
    document = json_response(openapi_document(secured, served))

    async def openapi_json(request: Request) -> Response:
        return document

    async def docs(request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE)

    def asset(name: str) -> Route:
        async def serve(request: Request) -> Response:
            return FileResponse(SWAGGER_UI / name)

        return Route(f"/docs/{name}", serve, methods=["GET"])

    return [Route("/openapi.json", openapi_json, methods=["GET"]), Route("/docs", docs, methods=["GET"]),
            asset("swagger-ui.css"), asset("swagger-ui-bundle.js")]


def create_app(
    secured: bool = False, served: dict[str, str] | None = None, metrics_cache_seconds: float = 1.0
) -> Starlette:
    """The routes of the route table (routes.py), the API's description (`secured`: credentials are required;
    `served`: model name -> task), then one error body for every other path; /metrics rendered at most once per
    `metrics_cache_seconds`."""
    routes = [Route(r.path, _with_errors(HANDLERS[r.handler]), methods=[r.method]) for r in ROUTES]
    routes.append(Route("/metrics", metrics_page, methods=["GET"]))  # BentoML's own is off on the gateway
    routes += _document_routes(secured, served)
    routes.append(
        _Fallback("/{path:path}", _with_errors(not_found), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    )
    app = Starlette(routes=routes)
    app.state.metrics_page = scrape.CachedPage(ttl=metrics_cache_seconds)
    return app

"""The API described from the route table: the OpenAPI 3.1 document (`/openapi.json`, rendered at `/docs`),
and BentoML's client schema (`/schema.json`), which makes every route with a `client_method` a method of
`bentoml.SyncHTTPClient`/`AsyncHTTPClient`. Those methods call the routes themselves: the same validation,
errors, auth, rate limits, metrics and access log as any other caller."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bentoformers._version import __version__
from bentoformers.api.routes import ROUTES, SSE, RouteSpec
from bentoformers.api.schemas import ErrorBody
from bentoformers.errors import STATUS, ErrorType

REF = "#/components/schemas/{model}"
_JSON = "application/json"

# Which errors a route can answer: everything that parses a body, and what every request can meet.
_EVERY_REQUEST = (ErrorType.AUTHENTICATION, ErrorType.PERMISSION, ErrorType.RATE_LIMITED, ErrorType.TOO_LARGE,
                  ErrorType.OVERLOADED, ErrorType.TIMEOUT, ErrorType.SERVER, ErrorType.NOT_FOUND,
                  ErrorType.METHOD_NOT_ALLOWED)
_WITH_BODY = (ErrorType.INVALID_REQUEST, ErrorType.UNSUPPORTED_MEDIA_TYPE, ErrorType.VALIDATION)
# Statuses answered with another type's body: a body not in within the time (408), headers over the bounds (431).
_OTHER_STATUSES = {408: ErrorType.TIMEOUT, 431: ErrorType.TOO_LARGE}
_ERROR_HEADERS = {
    ErrorType.AUTHENTICATION: {"WWW-Authenticate": {"$ref": "#/components/headers/WWW-Authenticate"}},
    ErrorType.RATE_LIMITED: {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
    ErrorType.OVERLOADED: {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
    ErrorType.TIMEOUT: {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
}
_HEADERS = {
    "X-Request-ID": ("The request's id: the client's X-Request-ID when it sent a sane one, else a new one.",
                     {"type": "string"}),
    "RateLimit-Limit": ("Requests allowed per window for this caller (when rate limits are configured).",
                        {"type": "integer"}),
    "RateLimit-Remaining": ("Requests left in the current window.", {"type": "integer"}),
    "RateLimit-Reset": ("Seconds until the window resets.", {"type": "integer"}),
    "Retry-After": ("Seconds to wait before retrying.", {"type": "integer"}),
    "WWW-Authenticate": ("The Bearer challenge.", {"type": "string"}),
}
# BentoML's own routes (outside the route table) that the service answers.
_PLAIN_ROUTES = {
    "/livez": ("Liveness: the process answers.", "text/plain"),
    "/healthz": ("Liveness (the same as /livez).", "text/plain"),
    "/readyz": ("Readiness: 200 once the service can answer, 503 until then.", "text/plain"),
    "/metrics": ("Prometheus metrics of every worker process.", "text/plain"),
    "/openapi.json": ("This document.", _JSON),
    "/docs": ("This document, rendered (Swagger UI, served from this server).", "text/html"),
    "/schema.json": ("BentoML's client schema: the methods of `bentoml.SyncHTTPClient`.", _JSON),
}


def _schemas() -> tuple[dict[tuple[type[BaseModel], str], dict[str, str]], dict[str, Any]]:
    """(model, mode) -> its $ref, and the component schemas: request bodies as validated, answers as written."""
    keys = {(r.request, "validation") for r in ROUTES if r.request is not None}
    keys |= {(r.response, "serialization") for r in ROUTES if r.response is not None} | {(ErrorBody, "serialization")}
    refs, top = models_json_schema(sorted(keys, key=lambda k: (k[0].__name__, k[1])), ref_template=REF)
    return refs, top.get("$defs", {})


def _header_refs(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _operation(route: RouteSpec, secured: bool, refs: dict) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if route.response is not None:
        content[_JSON] = {"schema": refs[route.response, "serialization"]}
    if route.stream == SSE:  # OpenAPI 3.1: the schema of one event
        content[SSE] = {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "description": "A JSON chunk of the answer; `[DONE]` last. "
                                    "An error after the start arrives as a last chunk in the one error body."}},
        }}
    elif route.stream is not None:
        content[route.stream] = {"schema": {"type": "string"}}
    ok_headers = _header_refs("X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
    responses: dict[str, Any] = {"200": {"description": "OK", "headers": ok_headers, "content": content}}
    errors = _EVERY_REQUEST + (_WITH_BODY if route.request is not None else ())
    statuses = {STATUS[kind]: kind for kind in errors} | _OTHER_STATUSES
    for status in sorted(statuses):
        responses[str(status)] = {"$ref": f"#/components/responses/{statuses[status]}"}
    operation: dict[str, Any] = {
        "operationId": route.handler,
        "summary": route.summary,
        "tags": [route.task or "models"],
        "responses": responses,
    }
    if route.request is not None:
        operation["requestBody"] = {"required": True, "content": {_JSON: {"schema": refs[route.request, "validation"]}}}
    # An open server (no credentials configured) takes requests with or without a token.
    operation["security"] = [{"bearer": []}] if secured else [{}, {"bearer": []}]
    return operation


def openapi_document(secured: bool, served: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the gateway answers; `secured`: credentials are required;
    `served`: model name -> task, to list the models each route can be asked for."""
    refs, schemas = _schemas()
    for route in ROUTES:
        if served is not None and route.request is not None and "model" in route.request.model_fields:
            names = [name for name, task in served.items() if route.task in (None, task)]
            field = schemas[route.request.__name__]["properties"]["model"]
            kind = f"{route.task} models" if route.task else "models (any task)"
            field["description"] = f"The {kind} served here: {', '.join(names) or 'none'}; absent: the default."
            if names:
                field["anyOf"] = [{"type": "string", "enum": names}, {"type": "null"}]
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, secured, refs)
    for path, (summary, media) in _PLAIN_ROUTES.items():
        paths[path] = {"get": {
            "operationId": path.strip("/").replace(".", "_").replace("/", "_"),
            "summary": summary,
            "tags": ["service"],
            "security": [],
            "responses": {
                "200": {"description": "OK", "content": {media: {"schema": {"type": "string"} if media != _JSON
                                                                 else {"type": "object"}}}},
                **({"503": {"description": "Not ready", "content": {"text/plain": {"schema": {"type": "string"}}}}}
                   if path == "/readyz" else {}),
            },
        }}
    error_responses = {
        str(kind): {
            "description": f"{STATUS[kind]}: {kind}",
            "headers": {**_header_refs("X-Request-ID"), **_ERROR_HEADERS.get(kind, {})},
            "content": {_JSON: {"schema": refs[ErrorBody, "serialization"]}},
        }
        for kind in ErrorType
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bentoformers",
            "version": __version__,
            "description": "Embeddings, classification (zero-shot too), rerank, token classification and generation "
            "from Transformers models, native and OpenAI-, Cohere- and TEI-compatible. Every error has one body: `{\"error\": {\"type\", \"message\", \"param\"}}`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": error_responses,
            "headers": {name: {"description": text, "schema": schema} for name, (text, schema) in _HEADERS.items()},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key (`bf_<id>_<secret>`) or a JWT from your identity provider.",
            }},
        },
    }


def bentoml_schema() -> dict[str, Any]:
    """What BentoML serves at /schema.json, listing our routes: its clients make a method of each entry."""
    methods = []
    for route in ROUTES:
        if route.client_method is None or route.request is None:
            continue
        output: dict[str, Any] = {"type": "string", "is_stream": True, "media_type": route.stream} if (
            route.response is None) else _inline(route.response)
        methods.append({
            "name": route.client_method,
            "route": route.path,
            "description": route.summary,
            "batchable": False,
            "input": _inline(route.request),
            "output": output,
        })
    return {"name": "bentoformers", "type": "service", "routes": methods,
            "description": "Transformers models on BentoML; see /openapi.json for every route."}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    # BentoML's client reads `properties` and `required` at the top level, without following `$ref`s.
    return model.model_json_schema(mode="validation")


# Swagger UI as BentoML ships it (its legacy index page), so /docs works offline: no CDN.
SWAGGER_UI = Path(importlib.util.find_spec("bentoml").origin).parent / "_internal" / "server" / "static_content"
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bentoformers API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div><script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});</script>
</body></html>
"""

"""BentoML's own answers, given our way: its client schema with our routes in it, and a wrong method on a
known path as 405 in the one error body (Starlette's and BentoML's routes answer it in plain text).

`bentoml.SyncHTTPClient`/`AsyncHTTPClient` read `GET /schema.json` and make a method of each route listed
there. BentoML lists only `@bentoml.api` methods, and our routes are a mounted Starlette app, so its own
answer lists none; this middleware answers instead (BentoML's route would win inside the app) with the
routes of the route table, so the methods call those routes like any other client.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType, error_response


class BentoRoutesMiddleware:
    def __init__(self, app: ASGIApp, *, allowed: Mapping[str, frozenset[str]], schema: dict) -> None:
        """`allowed`: the methods of each known path (api/routes.py); `schema`: BentoML's client schema of them."""
        self.app, self.allowed = app, allowed
        self.schema = orjson.dumps(schema)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        allowed = self.allowed.get(path)
        if allowed is not None and method not in allowed and not _is_preflight(scope):
            error = ApiError(ErrorType.METHOD_NOT_ALLOWED, f"{path} takes {', '.join(sorted(allowed))}, not {method}",
                             headers={"Allow": ", ".join(sorted(allowed))})
            await error_response(error)(scope, receive, send)
        elif path == "/schema.json":
            await Response(self.schema, media_type="application/json")(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _is_preflight(scope: Scope) -> bool:
    # CORS preflight belongs to BentoML's CORS middleware, inside this one.
    return scope["method"] == "OPTIONS" and any(name == b"access-control-request-method" for name, _ in scope["headers"])

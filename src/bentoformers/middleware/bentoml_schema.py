"""BentoML's client schema with our routes in it.

`bentoml.SyncHTTPClient`/`AsyncHTTPClient` read `GET /schema.json` and make a method of each route listed
there. BentoML lists only `@bentoml.api` methods, and our routes are a mounted Starlette app, so its own
answer lists none; this middleware answers instead (BentoML's route would win inside the app) with the
routes of the route table, so the methods call those routes like any other client.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from bentoformers.api.openapi import bentoml_schema


class BentoSchemaMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.body = orjson.dumps(bentoml_schema())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/schema.json" and scope["method"] in ("GET", "HEAD"):
            await Response(self.body, media_type="application/json")(scope, receive, send)
            return
        await self.app(scope, receive, send)

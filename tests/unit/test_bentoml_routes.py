"""BentoRoutesMiddleware: /schema.json with our routes, and a wrong method as 405 in the one error body."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentoformers.api.openapi import bentoml_schema
from bentoformers.api.routes import ALLOWED_METHODS
from bentoformers.middleware.bentoml_routes import BentoRoutesMiddleware


def _client() -> TestClient:
    async def inner(request):
        return PlainTextResponse("inner")

    app = Starlette(routes=[Route("/{path:path}", inner, methods=["GET", "POST", "PUT", "OPTIONS", "DELETE"])])
    return TestClient(BentoRoutesMiddleware(app, allowed=ALLOWED_METHODS, schema=bentoml_schema()))


def test_schema_json_lists_the_client_methods():
    from bentoformers.api.routes import ROUTES

    body = _client().get("/schema.json").json()
    names = [r["name"] for r in body["routes"]]
    assert names == [r.client_method for r in ROUTES if r.client_method]
    assert {"embed", "classify", "generate"} <= set(names)
    assert {r["name"]: r["route"] for r in body["routes"]}["generate"] == "/generate/stream"


def test_a_wrong_method_on_a_known_path_is_405_in_the_one_body():
    client = _client()
    for method, path in [("GET", "/embed"), ("DELETE", "/v1/models"), ("OPTIONS", "/classify"), ("POST", "/livez"),
                         ("PUT", "/schema.json"), ("POST", "/docs")]:
        r = client.request(method, path)
        assert r.status_code == 405, (method, path)
        assert r.json()["error"]["type"] == "method_not_allowed_error" and r.headers["allow"]
    assert _client().post("/embed").text == "inner"
    assert _client().head("/v1/models").text == "" and _client().get("/unknown").text == "inner"


def test_cors_preflight_passes_through():
    r = _client().options("/embed", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"})
    assert r.text == "inner"

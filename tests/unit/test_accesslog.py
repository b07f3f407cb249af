"""The JSON access log and request metrics on a small Starlette app (no model)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import httpx
import pytest
from helpers import metric_value
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentoformers.api.routes import PROBE_PATHS, PUBLIC_PATHS
from bentoformers.middleware.access_log import AccessLogMiddleware
from bentoformers.middleware.request_id import RequestIdMiddleware
from bentoformers.observability import metrics
from bentoformers.security.identity import Identity


def logged(app):
    """The access log as the service composes it: the route table's paths, probes quiet when healthy."""
    return AccessLogMiddleware(app, known_paths=PUBLIC_PATHS, quiet_paths=PROBE_PATHS)


async def embed(request: Request) -> JSONResponse:
    request.state.model = "minilm"
    request.state.tokens = 7
    return JSONResponse({"ok": True})


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("handler failed")


class FakeAuth:
    """Stands in for issue 3's auth middleware: it leaves an identity object in the scope."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        scope.setdefault("state", {})["identity"] = Identity("key-42", frozenset({"*"}), "free", "key")
        await self.app(scope, receive, send)


@pytest.fixture
def lines():
    captured: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            captured.append(record.getMessage())

    handler = Keep()
    logging.getLogger("bentoformers.access").addHandler(handler)
    yield captured
    logging.getLogger("bentoformers.access").removeHandler(handler)


def make_client() -> TestClient:
    app = Starlette(routes=[Route("/embed", embed, methods=["POST"]), Route("/boom", boom)])
    return TestClient(logged(RequestIdMiddleware(FakeAuth(app))), raise_server_exceptions=False)


def count(route: str, code: str) -> float:
    return REGISTRY.get_sample_value("bentoformers_requests_total", {"route": route, "code": code}) or 0.0


def test_one_json_line_per_request_with_state_and_no_secrets(lines):
    before = count("/embed", "200")
    r = make_client().post(
        "/embed?api_key=sk-secret", json={}, headers={"x-request-id": "req-1", "authorization": "Bearer sk-secret"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-1"
    (line,) = lines
    assert "sk-secret" not in line
    entry = json.loads(line)
    assert entry["request_id"] == "req-1" and entry["identity"] == "key:key-42"
    assert entry["route"] == "/embed" and entry["path"] == "/embed" and entry["method"] == "POST"
    assert entry["status"] == 200 and entry["model"] == "minilm" and entry["tokens"] == 7
    assert entry["latency_ms"] > 0
    assert count("/embed", "200") == before + 1


def test_unknown_paths_share_one_label_and_a_generated_request_id(lines):
    before = count("other", "404")
    client = make_client()
    for i in range(3):
        assert client.get(f"/scan/{i}/wp-login.php").status_code == 404
    assert count("other", "404") == before + 3
    ids = {json.loads(line)["request_id"] for line in lines}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_a_failing_handler_is_logged_as_500(lines):
    assert make_client().get("/boom").status_code == 500
    entry = json.loads(lines[-1])
    assert entry["status"] == 500 and entry["route"] == "/boom"


def test_rejection_reasons_are_bounded():
    metrics.count_rejection("rate_limit_tokens")
    metrics.count_rejection("user supplied <script>")
    assert REGISTRY.get_sample_value("bentoformers_rejections_total", {"reason": "rate_limit_tokens"}) >= 1
    assert REGISTRY.get_sample_value("bentoformers_rejections_total", {"reason": "other"}) >= 1
    assert REGISTRY.get_sample_value("bentoformers_rejections_total", {"reason": "user supplied <script>"}) is None


def test_probes_are_counted_but_not_logged_when_healthy(lines):
    async def ready(request):
        return JSONResponse({}, status_code=200 if request.query_params.get("ok") else 503)

    app = Starlette(routes=[Route("/readyz", ready)])
    client = TestClient(logged(RequestIdMiddleware(app)))
    before = count("/readyz", "200")
    client.get("/readyz?ok=1")
    client.get("/readyz")
    assert count("/readyz", "200") == before + 1
    assert [json.loads(line)["status"] for line in lines] == [503]


def test_a_request_refused_before_routing_keeps_its_route_label(lines):
    async def refuse(scope, receive, send):  # like an auth middleware: answers before any routing
        await JSONResponse({"error": {}}, status_code=401)(scope, receive, send)

    client = TestClient(logged(RequestIdMiddleware(refuse)))
    before = count("/v1/embeddings", "401")
    client.post("/v1/embeddings", json={})
    client.post("/not/a/route", json={})
    assert count("/v1/embeddings", "401") == before + 1
    assert [json.loads(line)["route"] for line in lines] == ["/v1/embeddings", "other"]


_SERVED = r'''
import socket, sys, uvicorn
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from bentoformers.middleware.access_log import AccessLogMiddleware

async def ok(request):
    return JSONResponse({"ok": True})

async def scrape(request):
    return Response(generate_latest())

app = Starlette(routes=[Route("/embed", ok), Route("/readyz", ok), Route("/scrape", scrape)])
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(128)  # connections wait in the backlog until uvicorn accepts: the port is usable once printed
print(sock.getsockname()[1], file=sys.stderr, flush=True)
uvicorn.Server(uvicorn.Config(AccessLogMiddleware(app, queue_lines=100), log_level="error", lifespan="off")).run(
    sockets=[sock])
'''


def test_a_log_reader_that_stops_reading_never_blocks_serving_and_the_drops_are_counted():
    # stdout is a pipe this test never reads: it fills after ~64 KB, some 200 lines.
    server = subprocess.Popen([sys.executable, "-c", _SERVED], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = int(server.stderr.readline())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            statuses = [client.get("/embed").status_code for _ in range(2000)]
            assert statuses == [200] * 2000
            assert client.get("/readyz").status_code == 200
            dropped = metric_value(client.get("/scrape").text, "bentoformers_access_log_lines_dropped_total")
        assert dropped >= 1000  # 2,001 lines, of which the pipe and the queue hold a few hundred
    finally:
        server.kill()
        server.wait()

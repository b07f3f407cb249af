"""OverloadMiddleware around a small app: in-flight bound, body cap, timeout, and no exception escapes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bentoformers.api.routes import PROBE_PATHS
from bentoformers.middleware.overload import OverloadMiddleware


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("s", "0.3")))
    return JSONResponse({"bytes": len(await request.body())})


async def _stream(request: Request) -> StreamingResponse:
    async def chunks():
        for i in range(4):
            await asyncio.sleep(0.1)
            yield f"data: {i}\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _client(**limits) -> httpx.AsyncClient:
    app = Starlette(routes=[
        Route("/slow", _slow, methods=["POST"]),
        Route("/stream", _stream, methods=["POST"]),
        Route("/livez", lambda r: JSONResponse({"ok": True})),
    ])
    options = {"max_in_flight": 4, "timeout": 5.0, **limits}

    async def inner(scope, receive, send):  # a raw ASGI layer that raises, like a broken middleware
        if scope["type"] == "http" and scope["path"] == "/boom":
            raise RuntimeError("bug")
        await app(scope, receive, send)

    guard = OverloadMiddleware(inner, exempt_paths=PROBE_PATHS, **options)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://test", timeout=30)


async def _timed(coro):
    start = time.perf_counter()
    response = await coro
    return response, time.perf_counter() - start


def test_beyond_max_in_flight_requests_are_refused_at_once_with_retry_after():
    async def run():
        async with _client() as client:
            results = await asyncio.gather(*(_timed(client.post("/slow?s=0.5")) for _ in range(16)))
            probe = await client.get("/livez")
            return results, probe

    results, probe = asyncio.run(run())
    admitted = [s for r, s in results if r.status_code == 200]
    refused = [(r, s) for r, s in results if r.status_code != 200]
    assert len(admitted) == 4 and len(refused) == 12
    for r, seconds in refused:
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded_error"
        assert seconds < min(admitted)  # answered without waiting for a slot
    assert probe.status_code == 200


def test_timeout_answers_504_but_a_started_stream_runs_on():
    async def run():
        async with _client(timeout=0.2) as client:
            late = await _timed(client.post("/slow?s=3"))
            stream = await client.post("/stream")
            return late, stream

    (late, seconds), stream = asyncio.run(run())
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"
    assert seconds < 2
    assert stream.status_code == 200 and stream.text.count("data:") == 4


def test_an_exception_inside_becomes_a_500_in_the_one_body_not_a_hang(caplog):
    async def run():
        async with _client() as client:
            return await _timed(client.post("/boom"))

    response, seconds = asyncio.run(run())
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert seconds < 2
    assert "bug" in caplog.text  # logged for the operator, not sent to the client
    assert "bug" not in response.text


@pytest.mark.parametrize("path", ["/livez"])
def test_probes_bypass_the_in_flight_bound(path):
    async def run():
        async with _client(max_in_flight=1) as client:
            slow = asyncio.create_task(client.post("/slow?s=0.5"))
            await asyncio.sleep(0.1)
            probe = await client.get(path)
            await slow
            return probe

    assert asyncio.run(run()).status_code == 200

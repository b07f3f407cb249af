"""BodyMiddleware: header limits, body size, the time to send a body, and a client that leaves mid-upload."""

from __future__ import annotations

import asyncio
import logging

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bentoformers.middleware.access_log import AccessLogMiddleware
from bentoformers.middleware.body import BodyMiddleware
from bentoformers.middleware.request_id import RequestIdMiddleware

LIMITS = {"max_body_bytes": 1024, "body_timeout": 0.3, "max_header_bytes": 4096, "max_headers": 20}


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


def _app(**limits):
    inner = Starlette(routes=[Route("/echo", _echo, methods=["POST", "OPTIONS"]), Route("/openapi.json", _echo)])
    return AccessLogMiddleware(RequestIdMiddleware(BodyMiddleware(inner, **(LIMITS | limits))))


def _post(app, **kwargs) -> httpx.Response:
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/echo", **kwargs)

    return asyncio.run(run())


def test_too_many_or_too_large_headers_get_431_in_the_one_body():
    many = _post(_app(), content=b"{}", headers={f"x-h{i}": "v" for i in range(30)})
    large = _post(_app(), content=b"{}", headers={"x-big": "v" * 5000})
    for r in (many, large):
        assert r.status_code == 431, r.text
        assert r.json()["error"]["type"] == "request_too_large" and r.headers["x-request-id"]
    assert _post(_app(), content=b"{}", headers={f"x-h{i}": "v" for i in range(10)}).status_code == 200


def test_bodies_over_the_cap_get_413_declared_or_chunked():
    async def chunked(size):
        yield b"x" * size

    assert _post(_app(), content=b"x" * 2048).status_code == 413
    assert _post(_app(), content=chunked(2048)).status_code == 413
    fits = _post(_app(), content=chunked(1000))
    assert fits.status_code == 200 and fits.json() == {"bytes": 1000}


def test_a_body_that_does_not_arrive_in_time_gets_408_with_connection_close():
    async def dribble():
        for _ in range(100):  # a byte every 0.05 s: each read is quick, the whole body is not
            await asyncio.sleep(0.05)
            yield b"x"

    r = _post(_app(), content=dribble())
    assert r.status_code == 408, r.text
    assert r.json()["error"]["type"] == "timeout_error" and r.headers["x-request-id"]
    assert r.headers["connection"] == "close"


def test_a_client_that_leaves_mid_upload_is_a_quiet_499_not_a_500(caplog):
    answered = []

    async def run():
        messages = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0)

        async def send(message):
            answered.append(message)

        scope = {"type": "http", "method": "POST", "path": "/echo", "raw_path": b"/echo", "query_string": b"",
                 "headers": [(b"content-length", b"100")], "client": ("127.0.0.1", 1), "server": ("test", 80),
                 "scheme": "http", "http_version": "1.1", "root_path": ""}
        await _app()(scope, receive, send)

    with caplog.at_level(logging.INFO, logger="bentoformers.access"):
        asyncio.run(run())
    assert answered == []  # nobody to answer
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bentoformers.access"]
    assert '"status":499' in line
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _scope(method: str, path: str, headers: dict[str, str]) -> dict:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()], "client": ("127.0.0.1", 1),
            "server": ("test", 80), "scheme": "http", "http_version": "1.1", "root_path": "", "state": {}}


async def _call(app, scope: dict, chunks: list[bytes], then_wait: asyncio.Event | None = None) -> list[dict]:
    """Calls `app` with a body sent as `chunks` (the last one ends it unless `then_wait` is given: the client
    then sends nothing more until that event, and leaves); the messages it answered."""
    answered, pending = [], list(chunks)

    async def receive():
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending) or then_wait is not None}
        await (then_wait or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message):
        answered.append(message)

    await app(scope, receive, send)
    return answered


def _status(answered: list[dict]) -> tuple[int, dict[bytes, bytes]]:
    start = answered[0]
    return start["status"], dict(start["headers"])


def test_a_preflight_or_a_doc_request_with_a_body_is_refused_at_once_unread():
    preflight = _scope("OPTIONS", "/echo", {"access-control-request-method": "POST", "origin": "http://x",
                                            "content-length": "1000"})
    docs = _scope("GET", "/openapi.json", {"transfer-encoding": "chunked"})

    async def run():
        app = _app(bodiless_paths=frozenset({"/openapi.json"}))
        never = asyncio.Event()  # 1 KiB sent, then nothing: a read would wait for the body timeout
        return [await asyncio.wait_for(_call(app, scope, [b"x" * 100], then_wait=never), 0.2)
                for scope in (preflight, docs)]

    for answered in asyncio.run(run()):
        status, headers = _status(answered)
        assert status == 413 and headers[b"connection"] == b"close" and headers[b"x-request-id"]
        assert b'"type":"request_too_large"' in answered[1]["body"]


def test_body_bytes_being_read_are_bounded_across_requests_503_before_reading():
    async def run():
        app = _app(max_body_bytes=4096, max_bytes_in_flight=5000)
        slow_done = asyncio.Event()
        slow = asyncio.ensure_future(_call(  # declares 3000 bytes, sends 10, then holds them being read
            app, _scope("POST", "/echo", {"content-length": "3000"}), [b"x" * 10], then_wait=slow_done))
        await asyncio.sleep(0.01)
        declared = await _call(app, _scope("POST", "/echo", {"content-length": "2500"}), [b"x" * 2500])
        chunked = await _call(app, _scope("POST", "/echo", {"transfer-encoding": "chunked"}), [b"x" * 1000] * 3)
        small = await _call(app, _scope("POST", "/echo", {"content-length": "1500"}), [b"x" * 1500])
        slow_done.set()
        await slow
        after = await _call(app, _scope("POST", "/echo", {"content-length": "2500"}), [b"x" * 2500])
        return declared, chunked, small, after, app

    declared, chunked, small, after, app = asyncio.run(run())
    for answered in (declared, chunked):
        status, headers = _status(answered)
        assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        assert b'"type":"overloaded_error"' in answered[1]["body"]
    assert _status(small)[0] == 200 and _status(after)[0] == 200  # within the budget; released once read
    assert _middleware(app).bytes_in_flight == 0


def _middleware(app):
    while not isinstance(app, BodyMiddleware):
        app = app.app
    return app

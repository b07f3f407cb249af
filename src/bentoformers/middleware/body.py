"""The request's headers and body, bounded before any work: header count and size, body size, and the time
the client takes to send its body.

It sits inside authentication (so nobody unauthenticated gets a body buffered) and outside the in-flight
bound (so a client that dribbles its body never holds a slot). A slow body gets 408 after
`body_timeout` seconds in total (not per byte: a byte every few seconds would reset a per-read timer), with
`Connection: close`; headers over `max_header_bytes` or `max_headers` get 431; a body over `max_body_bytes`
413. A client that leaves before its body is in is not an error: nothing is answered (nobody is there),
the access log records 499, and nothing is logged as a failure.

What passes authentication without credentials (CORS preflight, the API's description: `bodiless_paths`) takes
no body: one that announces a body gets 413 at once, unread. And the bytes being read at once, by every
request of the process, are bounded by `max_bytes_in_flight`: a request whose body would pass it gets 503 +
Retry-After before it is read (a chunked body, whose size is unknown, counts as it comes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.middleware.refusal import header
from bentoformers.observability import metrics

CLIENT_GONE = 499  # nginx's "client closed request": the client left before an answer could reach it


class _ClientGone(Exception):
    pass


class _OverBudget(Exception):
    pass


class BodyMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float, max_header_bytes: int, max_headers: int,
        exempt_paths: frozenset[str] = frozenset(), bodiless_paths: frozenset[str] = frozenset(),
        max_bytes_in_flight: int | None = None, retry_after: int = 1,
    ) -> None:
        self.app, self.exempt_paths = app, exempt_paths  # probes and the scrape: no body to read
        self.bodiless_paths = bodiless_paths
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.max_header_bytes, self.max_headers = max_header_bytes, max_headers
        self.max_bytes_in_flight, self.retry_after = max_bytes_in_flight, retry_after
        self.bytes_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > self.max_headers or sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            metrics.count_rejection("request_too_large")
            await _answer(scope, receive, send, ApiError(
                ErrorType.TOO_LARGE,
                f"the request headers are over the limit ({self.max_headers} headers, {self.max_header_bytes} bytes)",
                status=431, headers={"Connection": "close"},
            ))
            return
        too_large = ApiError(
            ErrorType.TOO_LARGE, f"the request body is over the limit of {self.max_body_bytes} bytes",
            headers={"Connection": "close"},
        )
        length = _content_length(headers)
        if length is not None and length > self.max_body_bytes:
            metrics.count_rejection("request_too_large")
            await _answer(scope, receive, send, too_large)
            return
        announces_body = bool(length) or bool(header(scope, b"transfer-encoding"))
        if announces_body and (scope["path"] in self.bodiless_paths or _is_preflight(scope)):
            metrics.count_rejection("request_too_large")
            await _answer(scope, receive, send, ApiError(
                ErrorType.TOO_LARGE, "this request takes no body (a CORS preflight, the API's description)",
                headers={"Connection": "close"},
            ))
            return
        try:
            body = await self._read(receive, length)
        except _OverBudget:
            metrics.count_rejection("too_many_in_flight")
            await _answer(scope, receive, send, ApiError(
                ErrorType.OVERLOADED, f"too many request bodies are being read; retry after {self.retry_after}s",
                headers={"Retry-After": str(self.retry_after), "Connection": "close"},
            ))
            return
        except TimeoutError:
            metrics.count_rejection("body_timeout")
            await _answer(scope, receive, send, ApiError(
                ErrorType.TIMEOUT, f"the request body did not arrive within {self.body_timeout:g}s",
                status=408, headers={"Connection": "close"},
            ))
            return
        except _ClientGone:
            scope.setdefault("state", {})["status_if_unanswered"] = CLIENT_GONE
            return
        if body is None:
            metrics.count_rejection("request_too_large")
            await _answer(scope, receive, send, too_large)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, length: int | None) -> bytes | None:
        """The body (None past max_body_bytes), its bytes held against the process's budget while it is read:
        a declared length before the first byte, a chunked body as its bytes come. _OverBudget past it."""
        held = 0

        def hold(size: int) -> None:
            nonlocal held
            if self.max_bytes_in_flight is not None and self.bytes_in_flight + size > self.max_bytes_in_flight:
                raise _OverBudget
            self.bytes_in_flight += size
            held += size

        try:
            hold(length or 0)
            async with asyncio.timeout(self.body_timeout):
                return await _read_capped(receive, self.max_body_bytes, None if length is not None else hold)
        finally:
            self.bytes_in_flight -= held


async def _answer(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    await error_response(error)(scope, receive, send)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_capped(receive: Receive, cap: int, on_chunk: Callable[[int], None] | None = None) -> bytes | None:
    """The whole body, or None past `cap` bytes; _ClientGone if the client disconnects first. `on_chunk` is told
    each chunk's size as it comes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        if on_chunk is not None:
            on_chunk(len(chunk))
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and bool(header(scope, b"access-control-request-method"))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay

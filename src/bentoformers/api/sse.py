"""Streamed answers: server-sent events (a failure after the start arrives as a last event), and plain text."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from bentoformers.errors import ApiError, ErrorType

logger = logging.getLogger("bentoformers.gateway")


def sse_event(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def event_stream(
    request: Request,
    events: AsyncIterator[tuple[str, str | None, int]],
    first: tuple[str, str | None, int],
    chunk: Callable[[str, str | None, int], list[Any]],
) -> StreamingResponse:
    """Server-sent events: chunk(text, finish, tokens) gives the data of each event; then [DONE]."""

    async def body() -> AsyncIterator[bytes]:
        delta, finish, tokens = first
        try:
            while True:
                for data in chunk(delta, finish, tokens):
                    yield sse_event(data)
                if finish is not None:
                    break
                delta, finish, tokens = await anext(events)
            request.state.tokens = request.state.tokens + tokens
            yield sse_event(b"[DONE]")
        except ApiError as exc:  # the status line has gone out: the error travels as an event
            logger.warning("generation ended mid-stream: %s", exc.message)
            yield sse_event({"error": {"type": str(exc.kind), "message": exc.message, "param": exc.param}})
        except Exception:
            logger.exception("generation failed mid-stream")
            yield sse_event({"error": {"type": str(ErrorType.SERVER), "message": "the generation failed; see the server log", "param": None}})
        finally:
            # A client that went away stops its generation; the response task is being cancelled then,
            # so the cleanup must be shielded to run at all.
            with anyio.CancelScope(shield=True):
                await events.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def text_stream(
    request: Request, events: AsyncIterator[tuple[str, str | None, int]], first: tuple[str, str | None, int]
) -> StreamingResponse:
    """The new text as plain UTF-8 pieces. Plain text has no room for an error, so a failure after the start
    cuts the stream off (the exception reaches OverloadMiddleware, which logs it): the client sees an
    incomplete body rather than a text that looks whole."""

    async def body() -> AsyncIterator[bytes]:
        delta, finish, tokens = first
        try:
            while True:
                if delta:
                    yield delta.encode()
                if finish is not None:
                    break
                delta, finish, tokens = await anext(events)
            request.state.tokens = request.state.tokens + tokens
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/plain", headers=headers)

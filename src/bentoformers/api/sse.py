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


def event_stream(request: Request, events: AsyncIterator[Any], first: Any, chunk: Callable[[Any], list[Any]]) -> StreamingResponse:
    """Server-sent events: chunk(piece) gives the data of each event, for every piece of every choice (a
    generation.Piece); then [DONE]."""

    async def body() -> AsyncIterator[bytes]:
        piece, tokens = first, 0
        try:
            while piece is not None:
                for data in chunk(piece):
                    yield sse_event(data)
                if piece.finish is not None:
                    tokens += piece.tokens
                piece = await anext(events, None)
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


def text_stream(request: Request, events: AsyncIterator[Any], first: Any) -> StreamingResponse:
    """One choice's new text as plain UTF-8 pieces (generation.Piece events). Plain text has no room for an
    error, so a failure after the start cuts the stream off (the exception reaches OverloadMiddleware, which
    logs it): the client sees an incomplete body rather than a text that looks whole."""

    async def body() -> AsyncIterator[bytes]:
        piece = first
        try:
            while piece is not None:
                if piece.text:
                    yield piece.text.encode()
                if piece.finish is not None:
                    request.state.tokens = request.state.tokens + piece.tokens
                    break
                piece = await anext(events, None)
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/plain", headers=headers)

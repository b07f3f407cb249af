"""Admission at the gateway: bounded in-flight requests and a request timeout.

Inside authentication and the body's bounds (middleware/body.py, which has read the body before a slot
is taken). Beyond `max_in_flight` requests per worker a request is refused at once with 503 and
Retry-After (no queue); a request that has not started its response within `timeout` gets 504 (a stream
that has started runs on). It is also the safety net for the BentoML trap where an exception escaping an ASGI app hangs the
request until BentoML's own timeout: anything that escapes becomes a 500 in the one error body.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.observability import metrics

logger = logging.getLogger("bentoformers.overload")


class OverloadMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_in_flight: int, timeout: float, retry_after: int = 1,
        exempt_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app, self.exempt_paths = app, exempt_paths
        self.max_in_flight, self.timeout = max_in_flight, timeout
        self.retry_after = retry_after
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:  # they answer even when saturated
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            metrics.count_rejection("too_many_in_flight")
            await _answer(scope, receive, send, ApiError(
                ErrorType.OVERLOADED,
                f"the server is at capacity ({self.max_in_flight} requests in progress); "
                f"retry after {self.retry_after}s",
                headers={"Retry-After": str(self.retry_after)},
            ))
            return
        self.in_flight += 1
        try:
            await self._admitted(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                deadline.reschedule(None)  # a started response (a stream) is not cut off
            await send(message)

        try:
            async with asyncio.timeout(self.timeout) as deadline:
                await self.app(scope, receive, send_tracking)
        except TimeoutError:
            if not started:
                await _answer(scope, receive, send, ApiError(
                    ErrorType.TIMEOUT, f"no answer within the request timeout of {self.timeout:g}s",
                    headers={"Retry-After": str(self.retry_after)},
                ))
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                await _answer(scope, receive, send, ApiError(ErrorType.SERVER, "internal error; see the server log"))


async def _answer(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    await error_response(error)(scope, receive, send)

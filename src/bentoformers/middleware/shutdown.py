"""On SIGTERM the gateway finishes what it has and refuses what comes (serving/drain.py holds the signal).

For a short grace after the signal it still serves what its clients had sent (each answer with
`Connection: close`); after it, until its requests in flight are done and it has been idle for a moment,
it answers every new request at once with 503, `Retry-After` and `Connection: close`: a keep-alive client
is told to go elsewhere instead of losing its next request to a connection closed under it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.api.routes import PROBE_PATHS
from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.serving.drain import ShutdownDrain


class ShutdownMiddleware:
    def __init__(self, app: ASGIApp, *, drain: ShutdownDrain, retry_after: int = 1) -> None:
        self.app, self.drain, self.retry_after = app, drain, retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.drain.draining and path == "/readyz":
            await error_response(ApiError(ErrorType.OVERLOADED, "shutting down"))(scope, receive, send)
        elif self.drain.refusing and path not in PROBE_PATHS:
            error = ApiError(
                ErrorType.OVERLOADED, "the server is shutting down; retry on another replica",
                headers={"Retry-After": str(self.retry_after), "Connection": "close"},
            )
            await error_response(error)(scope, receive, send)
        elif path in PROBE_PATHS:  # probes and scrapes do not keep a draining worker alive
            await self.app(scope, receive, send)
        else:
            with self.drain.busy():
                await self.app(scope, receive, self._closing(send))

    def _closing(self, send: Send) -> Send:
        """While draining (its grace), each answer tells the client to close its connection."""

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        return send_closing

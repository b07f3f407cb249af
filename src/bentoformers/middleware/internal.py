"""On a model service: only our gateway may call it, proven by the shared internal token.

A model service is BentoML's internal (non-entry) service: it takes `application/vnd.bentoml+pickle`
bodies and unpickles them, which is code execution for whoever can reach it. The NetworkPolicy in deploy/
is the second wall; this is the first, and it holds where a CNI ignores policies. Every call but the
kubelet's probes must carry the token (`X-Bentoformers-Internal-Token`, compared in constant time): a
pickled body without it gets 415 before anything reads it, any other call 401. /metrics is not exempt:
with `BENTOFORMERS_METRICS_PORT` the model service serves its metrics on a port of their own
(observability/scrape.py), so a scraper never needs the API port.
"""

from __future__ import annotations

import hmac
import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.middleware.refusal import header

INTERNAL_TOKEN_HEADER = "X-Bentoformers-Internal-Token"
PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"
PROBES = frozenset({"/livez", "/healthz", "/readyz"})
logger = logging.getLogger("bentoformers.internal")


class InternalCallerMiddleware:
    def __init__(self, app: ASGIApp, *, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the internal token must be at least 16 characters")
        self.app, self.token = app, token.encode()
        self._last_warning = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        sent = header(scope, INTERNAL_TOKEN_HEADER.lower().encode()).encode("latin-1")
        if hmac.compare_digest(sent, self.token):
            await self.app(scope, receive, send)
            return
        self._warn(scope, bool(sent))
        if header(scope, b"content-type").lower().startswith(PICKLE_MEDIA_TYPE):
            error = ApiError(
                ErrorType.INVALID_REQUEST, f"{PICKLE_MEDIA_TYPE} is accepted from the gateway only", status=415
            )
        else:
            error = ApiError(ErrorType.AUTHENTICATION, "this is an internal model service: only the gateway may call it")
        await error_response(error)(scope, receive, send)

    def _warn(self, scope: Scope, had_token: bool) -> None:
        # At most one line a minute: anyone who can reach the port could otherwise flood the log.
        now = time.monotonic()
        if now - self._last_warning < 60:
            return
        self._last_warning = now
        client = scope.get("client")
        logger.warning(
            "refused a call to %s from %s: %s internal token (the gateway and every model service need the same "
            "BENTOFORMERS_INTERNAL_TOKEN)", scope["path"][:128], client[0] if client else "?",
            "wrong" if had_token else "no",
        )

"""A middleware's refusal (auth, rate limits): its answer in the one error body, and its reason for the metric."""

from __future__ import annotations

import logging

from starlette.types import Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.observability import metrics

logger = logging.getLogger("bentoformers.auth")


class Refused(Exception):
    """A refusal: the answer, and its reason for the rejection metric."""

    def __init__(self, reason: str, error: ApiError) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


async def answer_failed_check(exc: Exception, check: str, scope: Scope, receive: Receive, send: Send) -> None:
    """The answer when a middleware's check raised: a Refused gets its own error (counted by reason), anything
    else is logged and answered 500. Never an exception into BentoML: it would hang the request."""
    if isinstance(exc, Refused):
        metrics.count_rejection(exc.reason)
        error = exc.error
    else:
        logger.error("%s failed unexpectedly", check, exc_info=exc)
        error = ApiError(ErrorType.SERVER, "internal error; see the server log")
    await error_response(error)(scope, receive, send)


def header(scope: Scope, name: bytes) -> str:
    """The first value of a request header (lower-case name), or ""."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""

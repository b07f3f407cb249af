"""One error shape for every route: {"error": {"type", "message", "param"}} (the OpenAI shape)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import orjson
from starlette.responses import Response


class ErrorType(StrEnum):
    INVALID_REQUEST = "invalid_request_error"  # unparseable body
    VALIDATION = "validation_error"  # parsed, but a field is wrong
    TOO_LARGE = "request_too_large"  # over a documented limit
    NOT_FOUND = "not_found_error"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a body that is not declared JSON
    METHOD_NOT_ALLOWED = "method_not_allowed_error"  # a known path, another method
    AUTHENTICATION = "authentication_error"  # missing or invalid credentials
    PERMISSION = "permission_error"  # valid credentials without the route's scope
    RATE_LIMITED = "rate_limit_error"  # over the caller's tier
    TIMEOUT = "timeout_error"  # no answer within the request timeout
    OVERLOADED = "overloaded_error"
    SERVER = "server_error"


STATUS: dict[ErrorType, int] = {
    ErrorType.INVALID_REQUEST: 400,
    ErrorType.VALIDATION: 422,
    ErrorType.TOO_LARGE: 413,
    ErrorType.NOT_FOUND: 404,
    ErrorType.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.AUTHENTICATION: 401,
    ErrorType.PERMISSION: 403,
    ErrorType.RATE_LIMITED: 429,
    ErrorType.TIMEOUT: 504,
    ErrorType.OVERLOADED: 503,
    ErrorType.SERVER: 500,
}


class ApiError(Exception):
    def __init__(
        self,
        kind: ErrorType,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self._status = status  # a status other than its type's (408, 415, 431, 499)

    @property
    def status(self) -> int:
        return self._status or STATUS[self.kind]


def error_body(kind: ErrorType | str, message: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"type": str(kind), "message": message, "param": param}})


def error_response(exc: ApiError) -> Response:
    return Response(
        error_body(exc.kind, exc.message, exc.param),
        status_code=exc.status,
        headers=exc.headers,
        media_type="application/json",
    )

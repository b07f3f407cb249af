"""Who is calling, checked by a pure ASGI middleware (credentials: bentoformers.security).

The middleware sets `scope["state"]["identity"]` (an `Identity`) for everything inside it, answers 401
(`WWW-Authenticate: Bearer`) for missing or invalid credentials and 403 for a route outside the
identity's scopes, and never raises: BentoML hangs a request whose middleware raises.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.middleware.refusal import Refused, answer_failed_check, header
from bentoformers.observability import tracing
from bentoformers.security.authenticator import Authenticator
from bentoformers.security.identity import ALL, ANONYMOUS_TIER, Identity
from bentoformers.security.tokens import ExpiredCredentials


class AuthMiddleware:
    """Sets scope["state"]["identity"]; 401/403 in the one error body. With no authenticator, everyone is
    anonymous (identified by client address, for rate limits) with every scope."""

    def __init__(
        self, app: ASGIApp, authenticator: Authenticator | None, client_address: ClientAddress | None = None, *,
        open_paths: frozenset[str] = frozenset(), route_tasks: Mapping[str, str] | None = None,
    ) -> None:
        """`open_paths` need no credentials (probes, the scrape, the API's description); `route_tasks`: the scope
        each route needs (any other path needs a valid identity and no particular scope)."""
        self.app, self.auth = app, authenticator
        self.open_paths, self.route_tasks = open_paths, route_tasks or {}
        self.client_address = client_address or ClientAddress()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Probes, the metrics scrape, the API's description and CORS preflight need no credentials.
        path = scope.get("path")
        if scope["type"] != "http" or path in self.open_paths or _is_preflight(scope):
            await self.app(scope, receive, send)
            return
        try:
            with tracing.stage("authenticate"):
                identity = self._identify(scope)
        except Exception as exc:
            await answer_failed_check(exc, "authentication", scope, receive, send)
            return
        scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)

    def _identify(self, scope: Scope) -> Identity:
        if self.auth is None:
            return Identity(self.client_address(scope), frozenset({ALL}), ANONYMOUS_TIER, "anonymous")
        authorization = header(scope, b"authorization")
        scheme, _, token = authorization.partition(" ")
        if not authorization:
            raise _unauthorized("missing credentials: send `Authorization: Bearer <API key or JWT>`",
                                reason="missing_credentials")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("unsupported authorization scheme: send `Authorization: Bearer <API key or JWT>`")
        try:
            identity = self.auth.identify(token.strip())
        except ExpiredCredentials:
            raise _unauthorized("the token has expired", error="invalid_token", reason="expired_credentials") from None
        if identity is None:
            raise _unauthorized("invalid credentials", error="invalid_token")
        task = self.route_tasks.get(scope["path"].rstrip("/") or "/")
        if task is not None and not identity.may(task):
            raise Refused("forbidden", ApiError(
                ErrorType.PERMISSION,
                f"this credential may not call {task} (its scopes: {', '.join(sorted(identity.scopes)) or 'none'})",
            ))
        return identity


def _unauthorized(message: str, error: str | None = None, reason: str = "invalid_credentials") -> Refused:
    challenge = f'Bearer realm="bentoformers", error="{error}"' if error else 'Bearer realm="bentoformers"'
    return Refused(reason, ApiError(ErrorType.AUTHENTICATION, message, headers={"WWW-Authenticate": challenge}))


def _is_preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and bool(header(scope, b"access-control-request-method"))

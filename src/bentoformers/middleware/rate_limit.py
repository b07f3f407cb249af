"""Requests per identity, counted after AuthMiddleware (the limits themselves: bentoformers.security.ratelimit)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoformers.errors import ApiError, ErrorType
from bentoformers.middleware.refusal import Refused, answer_failed_check
from bentoformers.observability import tracing
from bentoformers.security.identity import Identity
from bentoformers.security.ratelimit import Budget, RateLimiter, StoreUnavailable, Verdict, window


class RateLimitMiddleware:
    """Counts requests per identity (after AuthMiddleware); 429 with Retry-After and RateLimit-* headers."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        identity = scope.get("state", {}).get("identity") if scope["type"] == "http" else None
        if not isinstance(identity, Identity):  # public paths, preflight, non-HTTP
            await self.app(scope, receive, send)
            return
        try:
            verdict = await self._check(scope, identity)
        except Exception as exc:
            await answer_failed_check(exc, "rate limit check", scope, receive, send)
            return
        if verdict is None:
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode(), v.encode()) for k, v in verdict.headers().items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A token-budget 429 already carries its own RateLimit-* (and Retry-After): keep those,
                # rather than add the request limit's under the same names.
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                message["headers"] = headers + [(k, v) for k, v in extra if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _check(self, scope: Scope, identity: Identity) -> Verdict | None:
        tier = self.limiter.tier_of(identity)
        if tier is None:
            raise Refused("unknown_tier", ApiError(
                ErrorType.PERMISSION,
                f"this credential's rate-limit tier {identity.tier!r} is not configured here "
                f"(tiers: {', '.join(sorted(self.limiter.tiers))}; no 'default' tier to fall back to)",
            ))
        key = identity.name
        scope["state"]["rate_limit"] = Budget(self.limiter, key, tier)
        if tier.requests is None:
            return None
        try:
            with tracing.stage("rate_limit"):
                verdict = await self.limiter.hit(tier.requests, f"{key}:requests")
        except StoreUnavailable:
            error = self.limiter.store_error()
            if error is not None:
                raise Refused("rate_limit_store_unavailable", error) from None
            return None
        if not verdict.allowed:
            raise Refused("rate_limit_requests", ApiError(
                ErrorType.RATE_LIMITED,
                f"rate limit reached: {verdict.limit} requests per {window(tier.requests)}; "
                f"retry after {verdict.reset_seconds}s",
                headers=verdict.headers(),
            ))
        return verdict

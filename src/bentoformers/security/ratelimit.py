"""Per-identity rate limits: requests and tokens per window, per tier, with the `limits` library.

A request is charged its tokens when admitted: its input tokens, and for generation its prompt plus every
new token it may generate (its `max_tokens` for each choice), so no generation can cost more than its
caller's budget held when it started.

Sliding window counters (the `limits` strategy that weighs the previous window): no double burst at a
window edge, O(1) storage however large a token charge is, and a refused hit takes nothing. With
`memory://` the counters live in each worker process: a limit of N admits up to N per worker and per
replica. With `redis://…` they are shared by every worker and replica.

When the store fails (Redis down), `on_store_error` decides: "open" admits (the limits are off until
it is back; authentication still holds) and "closed" answers 503. A store that does not answer within
`store_timeout` (a hung Redis) has failed too. Either way the store is left alone for a second after a
failure, so a dead Redis costs one connection attempt per second, not one per request, and one log line
per outage. Only the store's own errors count as "down": any other exception is a bug, and propagates.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

from limits import RateLimitItem, parse
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from starlette.requests import Request

from bentoformers.errors import ApiError, ErrorType
from bentoformers.observability import metrics, tracing
from bentoformers.security.identity import DEFAULT_TIER, Identity
from bentoformers.settings import Settings

logger = logging.getLogger("bentoformers.ratelimit")
STORE_BACKOFF_SECONDS = 1.0


@dataclass(frozen=True)
class Tier:
    requests: RateLimitItem | None = None
    tokens: RateLimitItem | None = None

    @classmethod
    def parse(cls, name: str, spec: dict[str, str]) -> Tier:
        unknown = set(spec) - {"requests", "tokens"}
        if unknown:
            raise ValueError(f"tier {name!r}: unknown keys {sorted(unknown)}; use requests and tokens")
        try:
            return cls(*(parse(spec[k]) if spec.get(k) else None for k in ("requests", "tokens")))
        except ValueError as exc:
            raise ValueError(f"tier {name!r}: {exc} (write limits like '600/minute' or '10 per second')") from None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_seconds)
        return headers


class StoreUnavailable(Exception):
    pass


class RateLimiter:
    def __init__(
        self,
        tiers: dict[str, Tier],
        storage_uri: str = "memory://",
        on_store_error: Literal["open", "closed"] = "open",
        retry_after: int = 1,
        store_timeout: float = 0.25,
    ) -> None:
        self.tiers = tiers
        self.store_timeout = store_timeout
        self.shared = not storage_uri.startswith("memory://")
        self.on_store_error, self.retry_after = on_store_error, retry_after
        options = {}
        if self.shared:
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # redis-py (coredis, limits' default, lost its first connection in one worker in three runs).
            # No client-side retries: a hit is not idempotent, and a retried one after a slow reply would
            # count twice. A failure is handled here instead (on_store_error, then a second's rest).
            options = {"implementation": "redispy", "socket_connect_timeout": store_timeout,
                       "socket_timeout": store_timeout, "retry": Retry(NoBackoff(), 0)}
        storage = storage_from_string(f"async+{storage_uri}", wrap_exceptions=True, **options)
        self.strategy = SlidingWindowCounterRateLimiter(storage)
        self._skip_store_until = 0.0
        self._unknown_tiers: set[str] = set()
        self.storage_label = storage_uri.split("@")[-1]  # never log a password in the URL

    @classmethod
    def from_settings(cls, settings: Settings, announce: bool = True) -> RateLimiter | None:
        """`announce`: log where the counters live (once per start, like the authentication mode)."""
        if not settings.rate_limit_tiers:
            if announce:
                logger.info("rate limits off (no BENTOFORMERS_RATE_LIMIT_TIERS)")
            return None
        tiers = {name: Tier.parse(name, spec) for name, spec in settings.rate_limit_tiers.items()}
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url is not None else ""
        limiter = cls(
            tiers, redis_url or "memory://", settings.rate_limit_on_store_error, settings.retry_after_seconds,
            settings.rate_limit_store_timeout_seconds,
        )
        if not announce:
            return limiter
        if limiter.shared:
            logger.info("rate limits shared across workers and replicas in %s (on store error: %s)",
                        limiter.storage_label, settings.rate_limit_on_store_error)
        else:
            logger.warning("rate limits are PER WORKER PROCESS (memory://): each worker and replica counts on its "
                           "own; set BENTOFORMERS_REDIS_URL=redis://… to share them")
        return limiter

    def tier_of(self, identity: Identity) -> Tier | None:
        """The caller's tier, else `default`; None (refuse) when neither is configured, said once per tier in the
        log (not at start: a warning logged at import leaves BentoML's worker log lines without their name)."""
        tier = self.tiers.get(identity.tier) or self.tiers.get(DEFAULT_TIER)
        if tier is None and identity.tier not in self._unknown_tiers:
            self._unknown_tiers.add(identity.tier)
            logger.warning("rate-limit tier %r is not configured and there is no %r tier: its callers are refused "
                           "(403); tiers: %s", identity.tier, DEFAULT_TIER, ", ".join(sorted(self.tiers)))
        return tier

    async def hit(self, item: RateLimitItem, key: str, cost: int = 1) -> Verdict:
        """Counts `cost` against `item` for `key`. Raises StoreUnavailable when the store fails."""
        if time.monotonic() < self._skip_store_until:
            raise StoreUnavailable
        try:
            async with asyncio.timeout(self.store_timeout):
                allowed = await self.strategy.hit(item, key, cost=cost)
                stats = await self.strategy.get_window_stats(item, key)
        except (StorageError, TimeoutError) as exc:
            if self._skip_store_until == 0.0:
                cause = exc.__cause__ or exc
                why = f"{type(cause).__name__}: {cause}" if isinstance(exc, StorageError) else (
                    f"no answer within {self.store_timeout:g}s")
                logger.error("rate limit store %s unreachable (%s); failing %s until it is back",
                             self.storage_label, why, self.on_store_error)
            self._skip_store_until = time.monotonic() + STORE_BACKOFF_SECONDS
            raise StoreUnavailable from None
        if self._skip_store_until:
            logger.warning("rate limit store %s is back", self.storage_label)
            self._skip_store_until = 0.0
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        return Verdict(allowed, item.amount, stats.remaining, reset)

    def store_error(self) -> ApiError | None:
        if self.on_store_error == "open":
            return None
        return ApiError(
            ErrorType.OVERLOADED,
            "rate limits cannot be checked right now; retry shortly",
            headers={"Retry-After": str(self.retry_after)},
        )


@dataclass(frozen=True)
class Budget:
    """This request's caller and tier, left in scope["state"]["rate_limit"] for charge_tokens()."""

    limiter: RateLimiter
    key: str
    tier: Tier

    async def charge(self, tokens: int, what: str = "input tokens") -> None:
        item = self.tier.tokens
        if item is None or tokens <= 0:
            return
        if tokens > item.amount:
            metrics.count_rejection("request_too_large")
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"this request holds {tokens} {what}; your tier allows {item.amount} per {window(item)}",
            )
        try:
            verdict = await self.limiter.hit(item, f"{self.key}:tokens", cost=tokens)
        except StoreUnavailable:
            error = self.limiter.store_error()
            if error is not None:
                metrics.count_rejection("rate_limit_store_unavailable")
                raise error from None
            return
        if not verdict.allowed:
            metrics.count_rejection("rate_limit_tokens")
            raise ApiError(
                ErrorType.RATE_LIMITED,
                f"input token budget exhausted: {item.amount} tokens per {window(item)}, {verdict.remaining} left, "
                f"this request needs {tokens} ({what}); retry after {verdict.reset_seconds}s",
                headers=verdict.headers(),
            )


async def charge_tokens(request: Request, tokens: int, what: str = "input tokens") -> None:
    """Counts a request's tokens against its caller's budget; 429 beyond it. No-op when limits are off."""
    budget = request.scope.get("state", {}).get("rate_limit")
    if isinstance(budget, Budget):
        with tracing.stage("rate_limit"):
            await budget.charge(tokens, what)


def window(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else f"{item.multiples} {unit}s"

"""Rate limits per identity, in memory and in a real Redis (including Redis going away and coming back)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bentoformers.errors import ApiError, error_response
from bentoformers.middleware.auth import AuthMiddleware
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.middleware.rate_limit import RateLimitMiddleware
from bentoformers.security.authenticator import Authenticator
from bentoformers.security.keys import KeyStore, create_key
from bentoformers.security.ratelimit import RateLimiter, Tier, charge_tokens
from bentoformers.settings import Settings

# Hour windows: the sliding window counter may admit one extra right at a window edge, which a
# minute window would make a (rare) flake.
TIERS = {
    "default": Tier.parse("default", {"requests": "3/hour", "tokens": "100/hour"}),
    "gold": Tier.parse("gold", {"requests": "5/hour"}),
}


async def _embed(request: Request) -> JSONResponse:
    try:
        await charge_tokens(request, int(request.query_params.get("tokens", "0")))
    except ApiError as exc:
        return error_response(exc)
    return JSONResponse({"ok": True})


def _stack(limiter: RateLimiter, keys: KeyStore | None = None, trusted: tuple[str, ...] = ()) -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/embed", _embed, methods=["POST"])])
    authenticator = Authenticator(keys) if keys else None
    asgi = AuthMiddleware(RateLimitMiddleware(app, limiter), authenticator, ClientAddress(trusted))
    transport = httpx.ASGITransport(app=asgi, client=("10.0.0.2", 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    made = {name: create_key(name, ["*"], tier, path)[0] for name, tier in [("a", "default"), ("b", "default"),
                                                                             ("g", "gold"), ("x", "platinum")]}
    return KeyStore.load(path), made


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_per_window_with_ratelimit_headers(keys):
    store, made = keys

    async def run():
        async with _stack(RateLimiter(TIERS), store) as client:
            return [await client.post("/embed", headers=_bearer(made["a"])) for _ in range(5)]

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert [r.headers["ratelimit-remaining"] for r in responses] == ["2", "1", "0", "0", "0"]
    assert all(r.headers["ratelimit-limit"] == "3" for r in responses)
    refused = responses[-1]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 0 < int(refused.headers["retry-after"]) <= 3600
    assert refused.headers["retry-after"] == refused.headers["ratelimit-reset"]


def test_each_identity_has_its_own_counter_and_its_tier(keys):
    store, made = keys

    async def run():
        async with _stack(RateLimiter(TIERS), store) as client:
            return {name: [(await client.post("/embed", headers=_bearer(made[name]))).status_code for _ in range(6)]
                    for name in ["a", "b", "g", "x"]}

    admitted = {name: codes.count(200) for name, codes in asyncio.run(run()).items()}
    assert admitted == {"a": 3, "b": 3, "g": 5, "x": 3}  # an unknown tier falls back to "default"


def test_input_tokens_per_window(keys):
    store, made = keys

    async def run():
        tokens_only = {"default": Tier.parse("default", {"tokens": "100/hour"})}
        async with _stack(RateLimiter(tokens_only), store) as client:
            h = _bearer(made["a"])
            return [await client.post(f"/embed?tokens={n}", headers=h) for n in (60, 50, 150, 40)]

    ok, over_budget, over_tier, last = asyncio.run(run())
    assert ok.status_code == 200
    assert over_budget.status_code == 429 and "retry-after" in over_budget.headers
    assert "40 left" in over_budget.json()["error"]["message"]
    assert over_tier.status_code == 413  # could never fit: retrying would not help
    assert last.status_code == 200  # a refused charge takes nothing


def test_a_token_budget_429_carries_one_set_of_ratelimit_headers_the_token_limits(keys):
    store, made = keys

    async def run():
        async with _stack(RateLimiter(TIERS), store) as client:  # default: 3 requests and 100 tokens per hour
            h = _bearer(made["b"])
            return [await client.post(f"/embed?tokens={n}", headers=h) for n in (60, 50)]

    ok, over_budget = asyncio.run(run())
    assert ok.headers.get_list("ratelimit-limit") == ["3"]  # an admitted request: the request limit's headers
    assert over_budget.status_code == 429 and "input token budget" in over_budget.json()["error"]["message"]
    for name in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after"):
        assert len(over_budget.headers.get_list(name)) == 1, (name, over_budget.headers.get_list(name))
    assert over_budget.headers["ratelimit-limit"] == "100" and over_budget.headers["ratelimit-remaining"] == "40"


def test_anonymous_callers_are_counted_by_address_through_trusted_proxies():
    async def run():
        async with _stack(RateLimiter(TIERS), trusted=("10.0.0.0/8",)) as client:
            first = [(await client.post("/embed", headers={"X-Forwarded-For": "198.51.100.1"})).status_code
                     for _ in range(4)]
            other = (await client.post("/embed", headers={"X-Forwarded-For": "198.51.100.2"})).status_code
            return first, other

    first, other = asyncio.run(run())
    assert first == [200, 200, 200, 429] and other == 200


def test_redis_counts_are_shared_between_limiters(redis_server, keys):
    store, made = keys

    async def run():
        # Two limiters on one Redis stand for two worker processes (tests/e2e proves it with real workers).
        async with _stack(RateLimiter(TIERS, redis_server.url), store) as one, \
                _stack(RateLimiter(TIERS, redis_server.url), store) as two:
            codes = await asyncio.gather(*(c.post("/embed", headers=_bearer(made["a"])) for c in [one, two] * 4))
            return [r.status_code for r in codes]

    codes = asyncio.run(run())
    assert codes.count(200) == 3 and codes.count(429) == 5


def test_the_redis_url_is_a_secret_kept_off_the_command_line_and_still_reaches_redis(
    redis_server, keys, monkeypatch, capsys
):
    from bentoformers import cli

    # It can hold a password: no --redis-url flag (ps shows a command line to every user of the machine) ...
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "--redis-url" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        cli.main(["serve", "bentoformers:latest", "--redis-url", "redis://:hunter2@127.0.0.1:1", "--dry-run"])
    assert refused.value.code == cli.USAGE
    capsys.readouterr()
    # ... the environment sets it, and a dry run does not print it.
    monkeypatch.setenv("BENTOFORMERS_REDIS_URL", redis_server.url)
    assert cli.main(["serve", "bentoformers:latest", "--dry-run"]) == cli.OK
    assert redis_server.url not in capsys.readouterr().out
    settings = Settings(rate_limit_tiers={"default": {"requests": "3/hour"}})
    assert redis_server.url not in repr(settings) and str(redis_server.port) not in str(settings)
    store, made = keys

    async def run():
        # Two limiters from the settings, as two workers would build them: one count, in the real Redis.
        one, two = RateLimiter.from_settings(settings), RateLimiter.from_settings(settings)
        assert one.shared and one.storage_label == redis_server.url
        async with _stack(one, store) as a, _stack(two, store) as b:
            return [(await c.post("/embed", headers=_bearer(made["a"]))).status_code for c in [a, b, a, b]]

    assert asyncio.run(run()) == [200, 200, 200, 429]


@pytest.mark.parametrize("policy,status", [("open", 200), ("closed", 503)])
def test_when_redis_stops_the_configured_policy_applies_and_counting_resumes(redis_server, keys, policy, status):
    store, made = keys

    async def run():
        limiter = RateLimiter(TIERS, redis_server.url, on_store_error=policy)
        async with _stack(limiter, store) as client:
            h = _bearer(made["a"])
            before = (await client.post("/embed", headers=h)).status_code
            redis_server.stop()
            during = []
            for _ in range(3):
                start = time.perf_counter()
                during.append((await client.post("/embed?tokens=5", headers=h), time.perf_counter() - start))
            redis_server.start()  # an empty Redis: the count starts again
            await asyncio.sleep(1.1)  # the limiter leaves a failed store alone for a second
            after = [(await client.post("/embed", headers=h)).status_code for _ in range(4)]
            return before, during, after

    before, during, after = asyncio.run(run())
    assert before == 200
    for response, seconds in during:
        assert response.status_code == status, response.text
        assert seconds < 2, "an unreachable store must not stall requests"
        if status == 503:
            assert response.json()["error"]["type"] == "overloaded_error" and response.headers["retry-after"]
        else:
            assert "ratelimit-limit" not in response.headers  # nothing was counted
    assert after == [200, 200, 200, 429]


def test_bad_tier_specs_are_refused():
    with pytest.raises(ValueError, match="tier 'x'"):
        Tier.parse("x", {"requests": "lots"})
    with pytest.raises(ValueError, match="unknown keys"):
        Tier.parse("x", {"request": "1/second"})


def test_without_a_default_tier_an_unknown_tier_is_refused_not_unlimited(keys, caplog):
    store, made = keys
    gold_only = {"gold": Tier.parse("gold", {"requests": "5/hour"})}

    async def run():
        async with _stack(RateLimiter(gold_only), store) as client:
            return [await client.post("/embed", headers=_bearer(made["x"])) for _ in range(8)]  # x: "platinum"

    with caplog.at_level(logging.WARNING, logger="bentoformers.ratelimit"):
        responses = asyncio.run(run())
    assert {r.status_code for r in responses} == {403}  # was: 8 admitted, no limit at all
    error = responses[0].json()["error"]
    assert error["type"] == "permission_error" and "'platinum' is not configured" in error["message"]
    said = [r.getMessage() for r in caplog.records if "there is no 'default' tier" in r.getMessage()]
    assert len(said) == 1 and "'platinum'" in said[0]  # and the log says so, once


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_a_bug_in_the_limiter_is_a_500_with_its_traceback_not_a_store_outage(keys, caplog, policy):
    store, made = keys
    limiter = RateLimiter(TIERS, on_store_error=policy)

    async def broken(*args, **kwargs):
        raise TypeError("a bug, not an outage")

    limiter.strategy.hit = broken  # fault injection: the store is fine, our code is not

    async def run():
        async with _stack(limiter, store) as client:
            return [await client.post("/embed", headers=_bearer(made["a"])) for _ in range(2)]

    with caplog.at_level(logging.ERROR):
        responses = asyncio.run(run())
    # Was: under "open", admitted with the limits silently off; under "closed", a retryable 503.
    assert [r.status_code for r in responses] == [500, 500]
    assert responses[0].json()["error"]["type"] == "server_error"
    tracebacks = [r for r in caplog.records if r.exc_info and "a bug, not an outage" in str(r.exc_info[1])]
    assert len(tracebacks) == 2  # once per request: logged where it was answered, not again further out


@pytest.mark.parametrize("policy,status", [("open", 200), ("closed", 503)])
def test_a_hung_redis_costs_at_most_the_store_timeout(redis_server, keys, policy, status):
    store, made = keys
    timeout = 0.2

    async def run():
        limiter = RateLimiter(TIERS, redis_server.url, on_store_error=policy, store_timeout=timeout)
        async with _stack(limiter, store) as client:
            h = _bearer(made["b"])
            before = (await client.post("/embed", headers=h)).status_code
            redis_server.proc.send_signal(signal.SIGSTOP)  # hung: connections open, no answers
            try:
                during = []
                for _ in range(6):
                    start = time.perf_counter()
                    response = await client.post("/embed", headers=h)
                    during.append((response.status_code, time.perf_counter() - start))
                    await asyncio.sleep(0.4)  # past the limiter's rest after a failure: each one asks the store
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(1.1)
            after = (await client.post("/embed", headers=h)).status_code
            return before, during, after

    before, during, after = asyncio.run(run())
    assert before == 200 and after == 200
    assert {code for code, _ in during} == {status}
    # Was: 2 s (the socket timeout) for each request that asked the hung store. Generous: a shared CPU.
    assert max(seconds for _, seconds in during) < 5 * timeout, during


def test_a_jwt_subject_equal_to_a_key_id_is_another_identity(keys):
    import jwt as pyjwt

    from bentoformers.security.tokens import JwtVerifier

    store, made = keys
    secret = "unit-secret-" + "x" * 32
    claims = {"sub": "a", "scope": "*", "tier": "default", "exp": int(time.time()) + 600}  # "a": a key's id too
    token = pyjwt.encode(claims, secret, algorithm="HS256")
    seen = []

    async def who(request: Request) -> JSONResponse:
        seen.append(request.scope["state"]["identity"].name)
        return await _embed(request)

    app = Starlette(routes=[Route("/embed", who, methods=["POST"])])
    auth = Authenticator(store, JwtVerifier(secret=secret))
    asgi = AuthMiddleware(RateLimitMiddleware(app, RateLimiter(TIERS)), auth, ClientAddress())

    async def run():
        transport = httpx.ASGITransport(app=asgi, client=("10.0.0.2", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            keyed = [(await client.post("/embed", headers=_bearer(made["a"]))).status_code for _ in range(3)]
            tokened = [(await client.post("/embed", headers=_bearer(token))).status_code for _ in range(3)]
            return keyed, tokened

    assert asyncio.run(run()) == ([200, 200, 200], [200, 200, 200])  # two budgets of 3, not one
    assert seen == ["key:a"] * 3 + ["jwt:a"] * 3

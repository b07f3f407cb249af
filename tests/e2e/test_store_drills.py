"""Drills at a real 2-worker `bentoml serve` with API keys, JWT and a real Redis: Redis killed and restarted
under load with both store-error policies, identities in their namespaces, unknown tiers, and a key file that
breaks right after a revocation."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import httpx
import jwt
import pytest
import yaml
from helpers import RedisServer, running_server

from bentoformers.security.keys import create_key

JWT_SECRET = "drill-secret-" + "x" * 32
LIMIT = 10  # requests per day for the "ten" tier
WORKERS = 2


@pytest.fixture(scope="module", params=["open", "closed"])
def drilled(request, minilm_path, tmp_path_factory):
    policy = request.param
    work = tmp_path_factory.mktemp(f"drill-{policy}")
    redis = RedisServer(work)
    redis.start()
    keys_file = work / "keys.yaml"
    keys = {name: create_key(name, ["embeddings"], tier, keys_file)[0]
            for name, tier in [("limited", "ten"), ("after", "ten"), ("load", "bulk"), ("svc", "bulk"),
                               ("revoked", "bulk"), ("platinum", "platinum")]}
    env = {
        **os.environ,
        "BENTOML_CONFIG_OPTIONS": f"services.bentoformers.workers={WORKERS}",
        "BENTOFORMERS_API_KEYS_FILE": str(keys_file),
        "BENTOFORMERS_JWT_SECRET": JWT_SECRET,
        "BENTOFORMERS_REDIS_URL": redis.url,
        # No "default" tier: an unknown one is refused.
        "BENTOFORMERS_RATE_LIMIT_TIERS": f'{{"ten": {{"requests": "{LIMIT}/day"}}, "bulk": {{"requests": "100000/day"}}}}',
        "BENTOFORMERS_RATE_LIMIT_ON_STORE_ERROR": policy,
        "BENTOFORMERS_MODELS": "minilm",
    }
    serve = [sys.executable, "-m", "bentoml", "serve", "service:Gateway"]
    try:
        with running_server(serve, work / "serve.log", env) as running:
            yield {"url": running.url, "keys": keys, "log": running.log, "redis": redis, "policy": policy,
                   "keys_file": keys_file}
    finally:
        redis.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _spread(url: str, key: str, n: int, path: str = "/embed") -> list[int]:
    """n requests, three at a time on fresh connections, so both workers take some."""
    async def one(i):
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{url}{path}", json={"inputs": f"text {i}"}, headers=_auth(key))
            return r.status_code

    out = []
    for group in range(0, n, 3):
        out += await asyncio.gather(*(one(i) for i in range(group, min(n, group + 3))))
    return out


def test_redis_killed_and_restarted_under_load_counts_right_after_recovery(drilled):
    url, keys, redis, policy = drilled["url"], drilled["keys"], drilled["redis"], drilled["policy"]
    load: dict[str, list[int]] = {"before": [], "down": [], "recovering": [], "back": []}
    phase = ["before"]
    stop = threading.Event()

    def background():
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started_in = phase[0]  # the limiter asks the store as the request starts
                r = client.post(f"{url}/embed", json={"inputs": ["under load"] * 8}, headers=_auth(keys["load"]))
                load[started_in].append(r.status_code)
                if r.status_code == 503:
                    assert r.headers["retry-after"] and r.json()["error"]["type"] == "overloaded_error"

    threads = [threading.Thread(target=background) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        assert asyncio.run(_spread(url, keys["limited"], 4)) == [200] * 4
        phase[0] = "down"
        time.sleep(1)  # every request started "before" has been counted by now
        redis.proc.kill()  # SIGKILL: no goodbye to the open connections
        redis.proc.wait(10)
        redis.proc = None
        started = time.monotonic()
        down = asyncio.run(_spread(url, keys["limited"], 2 * LIMIT))
        time.sleep(2)
        redis.start()  # an empty Redis on the same port
        phase[0] = "recovering"
        time.sleep(1.5)  # the limiter leaves a failed store alone for a second
        phase[0] = "back"
        back = asyncio.run(_spread(url, keys["after"], 2 * LIMIT))
        recovered = time.monotonic() - started
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(f"\n{policy}: limited key while Redis was down {sorted(set(down))} x{len(down)}; "
          f"a fresh key after the restart: {back.count(200)} admitted, {back.count(429)} refused; "
          f"background load by phase: { {k: {c: v.count(c) for c in set(v)} for k, v in load.items()} }; "
          f"outage drill {recovered:.1f}s")
    assert set(down) == ({200} if policy == "open" else {503})  # uncounted, or refused: as configured
    assert back.count(200) == LIMIT and back.count(429) == LIMIT, back  # counting again, across both workers
    assert set(load["before"]) == {200} and set(load["back"]) == {200}, load
    for during in ("down", "recovering"):
        assert set(load[during]) <= {200, 503} and (policy == "closed" or set(load[during]) <= {200}), load
    log = drilled["log"].read_text()
    assert log.count("is back") >= 1 and "Traceback" not in log, log[-3000:]


def test_a_jwt_subject_equal_to_a_key_id_is_another_caller_in_logs_and_limits(drilled):
    url = drilled["url"]
    token = jwt.encode({"sub": "limited", "exp": int(time.time()) + 600, "scope": "embeddings", "tier": "ten"},
                       JWT_SECRET, "HS256")
    marker = f"jwt-{drilled['policy']}-{time.time_ns()}"
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{url}/embed", json={"inputs": "hi"}, headers={**_auth(token), "X-Request-ID": marker})
    assert r.status_code == 200, r.text  # its own budget: the key "limited" may be spent by now
    time.sleep(1)
    logged = [json.loads(ln) for ln in drilled["log"].read_text().splitlines() if marker in ln and ln.startswith("{")]
    assert [e["identity"] for e in logged] == ["jwt:limited"], logged


def test_an_unknown_tier_without_a_default_is_refused_and_says_so(drilled):
    url, keys = drilled["url"], drilled["keys"]
    codes = asyncio.run(_spread(url, keys["platinum"], 6))
    assert codes == [403] * 6  # was: unlimited
    r = httpx.post(f"{url}/embed", json={"inputs": "hi"}, headers=_auth(keys["platinum"]))
    assert "'platinum' is not configured" in r.json()["error"]["message"]
    token = jwt.encode({"sub": "t", "exp": int(time.time()) + 600, "scope": "embeddings"}, JWT_SECRET, "HS256")
    assert httpx.post(f"{url}/embed", json={"inputs": "hi"}, headers=_auth(token)).status_code == 403  # no tier claim
    assert "'platinum' is not configured and there is no 'default' tier" in drilled["log"].read_text()


def test_workers_agree_on_the_keys_when_the_file_breaks_after_a_revocation(drilled):
    url, keys, path = drilled["url"], drilled["keys"], drilled["keys_file"]
    if drilled["policy"] != "open":
        pytest.skip("once is enough: the key file does not depend on the store policy")
    original = path.read_text()
    assert set(asyncio.run(_spread(url, keys["revoked"], 6))) == {200}
    try:
        path.write_text(yaml.safe_dump([r for r in yaml.safe_load(original) if r["id"] != "revoked"]))
        time.sleep(1)  # some workers may have re-read it by now, others not
        path.write_text("{not: [valid")
        time.sleep(6)  # every worker has looked at the file since (every 5 s)
        revoked = asyncio.run(_spread(url, keys["revoked"], 9))
        kept = asyncio.run(_spread(url, keys["svc"], 9))
    finally:
        path.write_text(original)
    time.sleep(6)
    print(f"\nkey file broken after a revocation: revoked key {revoked}, a kept key {kept}")
    assert set(revoked) == {401}, "a worker that had not reloaded brought the revoked key back"
    assert set(kept) == {401}  # a broken file: none of its keys, on every worker alike
    assert set(asyncio.run(_spread(url, keys["svc"], 6))) == {200}  # fixed: every worker serves it again

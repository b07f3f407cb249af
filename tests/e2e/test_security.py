"""Security and overload on a real `bentoml serve` with 2 gateway workers, API keys, a JWT secret and a real Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import jwt
import pytest
from helpers import ROOT, RedisServer, free_port, running_server

from bentoformers.security.keys import create_key

JWT_SECRET = "e2e-secret-" + "x" * 32
LIMIT = 10  # requests per day for the "ten" tier (a day window: no window edge during the test)
MAX_IN_FLIGHT = 4  # per gateway worker
WORKERS = 2


@pytest.fixture(scope="module")
def secured(minilm_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("secured")
    redis = RedisServer(work)
    redis.start()
    keys_file = work / "keys.yaml"
    keys = {name: create_key(name, scopes, tier, keys_file)[0] for name, scopes, tier in [
        ("limited", ["embeddings"], "ten"),
        ("bulk", ["*"], "bulk"),
        ("classifier", ["classification"], "bulk"),
    ]}
    env = {
        **os.environ,
        # BentoML's text access log names the worker that answered (the cross-worker test reads it).
        "BENTOML_CONFIG_OPTIONS": f"services.bentoformers.workers={WORKERS} "
        "services.bentoformers.logging.access.enabled=true",
        "BENTOFORMERS_API_KEYS_FILE": str(keys_file),
        "BENTOFORMERS_JWT_SECRET": JWT_SECRET,
        "BENTOFORMERS_REDIS_URL": redis.url,
        "BENTOFORMERS_RATE_LIMIT_TIERS": f'{{"ten": {{"requests": "{LIMIT}/day"}}, "bulk": {{}}}}',
        "BENTOFORMERS_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "BENTOFORMERS_MODELS": "minilm",
    }
    serve = [sys.executable, "-m", "bentoml", "serve", "service:Gateway"]
    try:
        with running_server(serve, work / "serve.log", env) as running:
            yield {"url": running.url, "keys": keys, "log": running.log, "redis": redis}
    finally:
        redis.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_auth_is_enforced_through_bentoml_and_public_paths_stay_open(secured):
    url, keys = secured["url"], secured["keys"]
    body = {"inputs": "hello"}
    r = httpx.post(f"{url}/embed", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error" and r.headers["x-request-id"]
    assert httpx.post(f"{url}/embed", json=body, headers=_auth(keys["classifier"])).status_code == 403
    assert httpx.post(f"{url}/embed", json=body, headers=_auth(keys["bulk"])).status_code == 200
    claims = {"sub": "svc", "exp": int(time.time()) + 60, "scope": "embeddings", "tier": "bulk"}  # no "default" tier
    token = jwt.encode(claims, JWT_SECRET, "HS256")
    assert httpx.post(f"{url}/embed", json={"inputs": "hi"}, headers=_auth(token)).status_code == 200
    for path in ["/livez", "/readyz", "/metrics"]:
        assert httpx.get(f"{url}{path}").status_code == 200, path
    scraped = httpx.get(f"{url}/metrics").text
    for reason in ["missing_credentials", "forbidden"]:
        prefix = f'bentoformers_rejections_total{{reason="{reason}"'
        line = next(ln for ln in scraped.splitlines() if ln.startswith(prefix))
        assert float(line.split()[-1]) >= 1, line


def test_a_limit_of_n_admits_exactly_n_across_both_workers(secured):
    url, key = secured["url"], secured["keys"]["limited"]

    async def requests():
        # A fresh connection per request, a few at a time, so both workers take some (a single burst of
        # new connections tends to be accepted by one). A 503 (over the in-flight bound, refused before
        # the limiter counts it) is retried, as a client would.
        async def one(i):
            async with httpx.AsyncClient(timeout=30) as client:
                while True:
                    r = await client.post(f"{url}/v1/embeddings", json={"input": f"text {i}"}, headers=_auth(key))
                    if r.status_code != 503:
                        return r
                    await asyncio.sleep(0.05)

        out = []
        for group in range(LIMIT):
            out += await asyncio.gather(*(one(3 * group + j) for j in range(3)))
            await asyncio.sleep(0.05)
        return out

    responses = asyncio.run(requests())
    codes = [r.status_code for r in responses]
    time.sleep(1)  # the workers' access-log lines land asynchronously
    # Which worker answered: BentoML's access log names it ([entry_service:bentoformers:<worker>]).
    lines = [ln for ln in secured["log"].read_text().splitlines() if "path=/v1/embeddings" in ln]
    per_worker = {w: {c: sum(f"bentoformers:{w}]" in ln and f"status={c}" in ln for ln in lines) for c in (200, 429)}
                  for w in range(1, WORKERS + 1)}
    print(f"\ncross-worker limit of {LIMIT}/day, {len(codes)} requests: {codes.count(200)} admitted, "
          f"{codes.count(429)} refused (429); per worker {per_worker}")
    assert codes.count(200) == LIMIT and codes.count(429) == 2 * LIMIT, codes
    assert all(sum(counts.values()) > 0 for counts in per_worker.values()), "both workers took requests"
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) > 0 and refused.headers["ratelimit-remaining"] == "0"
    assert refused.headers["ratelimit-limit"] == str(LIMIT)


def test_burst_at_four_times_capacity_ends_in_200_or_a_fast_503(secured, sentences):
    url, key = secured["url"], secured["keys"]["bulk"]
    capacity = MAX_IN_FLIGHT * WORKERS
    body = {"inputs": sentences[:32], "truncate": True}

    async def burst():
        results = []

        async def one(client):
            start = time.perf_counter()
            r = await client.post(f"{url}/embed", json=body, headers=_auth(key))
            results.append((r.status_code, time.perf_counter() - start, r))

        clients = [httpx.AsyncClient(timeout=30) for _ in range(4 * capacity)]
        try:
            for _ in range(5):  # five waves of 4x capacity requests at once
                await asyncio.gather(*(one(c) for c in clients))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
        return results

    results = asyncio.run(burst())
    codes = [code for code, _, _ in results]
    admitted = sorted(s for code, s, _ in results if code == 200)
    rejected = sorted(s for code, s, _ in results if code != 200)
    p = lambda xs, q: 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    print(f"\nburst: 5 waves of {4 * capacity} concurrent requests (32 texts each) against capacity {capacity} "
          f"({MAX_IN_FLIGHT} in flight x {WORKERS} workers):\n"
          f"  admitted {len(admitted)} (p50 {p(admitted, .5):.1f} ms, p99 {p(admitted, .99):.1f} ms)\n"
          f"  rejected {len(rejected)} (p50 {p(rejected, .5):.1f} ms, p99 {p(rejected, .99):.1f} ms, "
          f"max {p(rejected, 1):.1f} ms)")
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert admitted and rejected
    for code, _, r in results:
        if code == 503:
            assert r.json()["error"]["type"] == "overloaded_error" and r.headers["retry-after"]
    time.sleep(1)
    assert "Traceback" not in secured["log"].read_text(errors="replace"), "overload is answered quietly"


def test_bentoml_clients_send_their_token_through_our_auth(secured):
    import bentoml
    from bentoml.exceptions import BentoMLException

    url, keys = secured["url"], secured["keys"]
    with bentoml.SyncHTTPClient(url, token=keys["bulk"]) as client:
        assert len(client.embed(inputs=["hello", "world"])["embeddings"]) == 2
    # The schema needs no credentials; the methods do, like the routes they call.
    for token, status, kind in [(None, 401, "authentication_error"), (keys["classifier"], 403, "permission_error")]:
        with bentoml.SyncHTTPClient(url, token=token) as client:
            with pytest.raises(BentoMLException) as caught:
                client.embed(inputs=["hello"])
        assert caught.value.error_code == status and f'"{kind}"' in caught.value.message


def test_credentials_never_reach_the_logs(secured):
    url, keys = secured["url"], secured["keys"]
    token = jwt.encode({"sub": "logcheck", "exp": int(time.time()) + 60}, JWT_SECRET, "HS256")
    forged = keys["bulk"][:-4] + "AAAA"
    for header in [keys["bulk"], keys["limited"], token, forged, "bf_nobody_" + "B" * 43]:
        httpx.post(f"{url}/embed", json={"inputs": "x"}, headers=_auth(header))
        httpx.post(f"{url}/nowhere", json={"inputs": "x"}, headers=_auth(header))
    time.sleep(1)  # the workers' log lines land asynchronously
    log = secured["log"].read_text(errors="replace")
    assert "POST" in log or "/embed" in log, "the access log is on, so requests were logged"
    for secret in [*keys.values(), token, forged, JWT_SECRET]:
        assert secret not in log
        # An API key's secret follows `bf_<id>_` (and may itself hold `_`); a JWT's signature follows its last dot.
        tail = secret.split("_", 2)[2] if secret.startswith("bf_") else secret.rsplit(".", 1)[-1]
        assert tail not in log


def test_a_container_without_credentials_refuses_to_start(minilm_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTOFORMERS_")}
    env["BENTOML_CONTAINERIZED"] = "true"
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:Gateway",
         "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "no credentials configured" in out.stdout + out.stderr
    env["BENTOFORMERS_AUTH"] = "disabled"
    check = subprocess.run([sys.executable, "-c", "import service"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    assert "AUTHENTICATION IS DISABLED" in check.stderr


def _readme_bash_blocks() -> list[str]:
    import re

    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_security_examples_run(secured, tmp_path):
    blocks = _readme_bash_blocks()
    (create,) = [b for b in blocks if b.startswith("bentoformers keys create")]
    made = subprocess.run(["bash", "-ec", create], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("bf_alice_") and key not in (tmp_path / "keys.yaml").read_text()
    (call,) = [b for b in blocks if b.startswith("curl") and "Authorization" in b]
    call = call.replace("http://localhost:3000", secured["url"])
    for api_key, expected in [(secured["keys"]["bulk"], '"embedding'), (key, "authentication_error")]:
        out = subprocess.run(["bash", "-ec", call], env={**os.environ, "BENTOFORMERS_API_KEY": api_key},
                             capture_output=True, text=True, timeout=60)
        assert expected in out.stdout, out.stdout[:500]

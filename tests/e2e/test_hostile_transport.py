"""Hostile and unlucky clients against a real `bentoml serve` (API keys on): a slowloris that dribbles bodies,
huge headers, clients that leave mid-upload. Figures are printed (`-s`) for the record."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import sys
import time

import httpx
import pytest
from conftest import running_server

from bentoformers.security.keys import create_key

pytestmark = pytest.mark.slow
BODY_TIMEOUT = 6  # seconds a client has to send its whole body (BENTOFORMERS_BODY_TIMEOUT_SECONDS)
DRIBBLERS = 256


@pytest.fixture(scope="module")
def hostile(minilm_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    key, _ = create_key("victim", ["*"], "default", work / "keys.yaml")
    env = {**os.environ, "BENTOFORMERS_MODELS": "minilm", "BENTOFORMERS_API_KEYS_FILE": str(work / "keys.yaml"),
           "BENTOFORMERS_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT)}
    serve = [sys.executable, "-m", "bentoml", "serve", "service:Gateway"]
    with running_server(serve, work / "serve.log", env) as running:
        yield running.url, key, running.log


async def _dribble(host: str, port: int, auth: str | None, seconds: float) -> bytes:
    """A chunked POST that sends one byte of body every 2 s until answered (or `seconds` pass); the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    head = "POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    writer.write((head + (f"Authorization: Bearer {auth}\r\n" if auth else "") + "\r\n").encode())
    answer = asyncio.ensure_future(_response(reader))
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            done, _ = await asyncio.wait({answer}, timeout=2)
            if done:
                break
            writer.write(b"1\r\n \r\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        if not answer.done():
            answer.cancel()
        writer.close()
    return answer.result() if answer.done() and not answer.cancelled() and not answer.exception() else b""


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head.lower())
    return head + (await reader.readexactly(int(length.group(1))) if length else b"")


def _percentiles(latencies: list[float]) -> str:
    q = statistics.quantiles(latencies, n=100)
    return f"p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms"


def test_slowloris_holds_no_slot_and_normal_requests_keep_getting_200(hostile):
    url, key, _ = hostile
    host, port = url.removeprefix("http://").split(":")
    body = {"inputs": ["a normal request"]}

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            async def normal(n):
                out = []
                for _ in range(n):
                    started = time.perf_counter()
                    r = await client.post("/embed", json=body)
                    out.append((r.status_code, time.perf_counter() - started))
                    await asyncio.sleep(0.05)
                return out

            idle = await normal(30)
            # Half send no credentials (401 before any body is read), half a valid key (408 after BODY_TIMEOUT).
            attack = [asyncio.ensure_future(_dribble(host, int(port), key if i % 2 else None, BODY_TIMEOUT + 8))
                      for i in range(DRIBBLERS)]
            await asyncio.sleep(1)
            loaded = await normal(60)
            ready = (await client.get("/readyz")).status_code
            return idle, loaded, ready, await asyncio.gather(*attack)

    idle, loaded, ready, answers = asyncio.run(run())
    statuses = [int(m.group(1)) if (m := re.match(rb"HTTP/1.1 (\d+)", a)) else None for a in answers]
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"\nslowloris, {DRIBBLERS} dribbling connections: their answers {counts}; normal requests idle "
          f"{_percentiles([s for _, s in idle])}, under attack {_percentiles([s for _, s in loaded])} "
          f"({sum(c == 200 for c, _ in loaded)}/{len(loaded)} got 200)")
    assert [c for c, _ in loaded] == [200] * len(loaded)
    assert ready == 200
    assert counts == {401: DRIBBLERS // 2, 408: DRIBBLERS // 2}
    for answer in answers:  # our error body and a request id on every one
        assert b'{"error":{"type":' in answer and b"x-request-id:" in answer.lower()


def test_huge_or_countless_headers_get_431(hostile):
    url, key, _ = hostile
    auth = {"Authorization": f"Bearer {key}"}
    many = httpx.post(f"{url}/embed", json={"inputs": ["x"]}, headers={**auth, **{f"x-h{i}": "v" for i in range(10_000)}},
                      timeout=60)
    big = httpx.post(f"{url}/embed", json={"inputs": ["x"]}, headers={**auth, "x-big": "v" * 8_000_000}, timeout=60)
    for r in (many, big):
        assert r.status_code == 431, r.text[:200]
        assert r.json()["error"]["type"] == "request_too_large" and r.headers["x-request-id"]


def test_a_client_that_leaves_mid_upload_is_a_quiet_499(hostile):
    url, key, log = hostile
    host, port = url.removeprefix("http://").split(":")
    for _ in range(20):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST /embed HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\": [".encode())
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        page = httpx.get(f"{url}/metrics").text
        if 'bentoformers_requests_total{code="499",route="/embed"} 20.0' in page:
            break
        time.sleep(0.2)
    embeds = [line for line in page.splitlines() if line.startswith("bentoformers_requests_total") and "/embed" in line]
    print(f"\n20 clients gone mid-upload: {embeds}")
    assert 'bentoformers_requests_total{code="499",route="/embed"} 20.0' in page
    assert 'bentoformers_requests_total{code="500"' not in page
    text = log.read_text()
    assert "Traceback" not in text and "ClientDisconnect" not in text

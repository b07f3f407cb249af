"""Generation with the models in their own processes (`BENTOFORMERS_MODEL_PROCESS=separate`): the gateway streams
tokens from the model service over BentoML's dependency client, whose HTTP session was replaced every 100 calls
(cutting the streams still on it) and whose calls were bounded in total by the model service's traffic timeout
(cutting long streams). Here that timeout is lowered to 1 s, so a stream of a few seconds is a "long" one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import httpx
import pytest
from helpers import running_server

SERVE = [sys.executable, "-m", "bentoformers.cli", "serve"]
MODEL_TIMEOUT_SECONDS = 1


@pytest.fixture(scope="module")
def split(served_build, tmp_path_factory):
    log = tmp_path_factory.mktemp("split-generation") / "serve.log"
    env = {
        **os.environ, "BENTOFORMERS_MODEL_PROCESS": "separate", "BENTOFORMERS_MODELS": "gpt2,chat",
        "BENTOML_CONFIG_OVERRIDES": json.dumps(
            {"services": {f"model-{name}": {"traffic": {"timeout": MODEL_TIMEOUT_SECONDS}} for name in ("gpt2", "chat")}}
        ),
    }
    with running_server(SERVE, log, env) as running:
        yield running


async def _stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict:
    """One streamed completion: its status, finish reason, usage, error (if any) and duration."""
    body = {"model": model, "prompt": "Rain fell over the", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.monotonic()
    got: dict = {"finish": None, "usage": None, "error": None, "done": False}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        got["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got["done"] = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                got["error"] = chunk["error"]
            for choice in chunk.get("choices", []):
                got["finish"] = choice.get("finish_reason") or got["finish"]
            got["usage"] = chunk.get("usage") or got["usage"]
    got["seconds"] = time.monotonic() - started
    return got


def _streams(url: str, model: str, max_tokens: int, concurrency: int, waves: int = 1) -> list[dict]:
    async def main():
        results = []
        async with httpx.AsyncClient(timeout=120) as client:
            for _ in range(waves):
                results += await asyncio.gather(*(_stream(client, url, model, max_tokens) for _ in range(concurrency)))
        return results

    return asyncio.run(main())


def _complete(result: dict, max_tokens: int) -> bool:
    """Answered 200, ended with a finish reason, its usage and [DONE], no error; all its tokens when cut by length.
    A sampled end of text may come first (the tiny random models sample it often): "stop" with 0 tokens is whole."""
    if result["status"] != 200 or result["error"] or not result["done"] or result["usage"] is None:
        return False
    tokens = result["usage"]["completion_tokens"]
    return result["finish"] == "stop" and tokens <= max_tokens or result["finish"] == "length" and tokens == max_tokens


def test_sixteen_concurrent_streams_in_the_split_all_complete(split):
    # 128 streams, 16 at a time: past the 100 calls after which BentoML's client replaced its session under them.
    results = _streams(split.url, "gpt2", max_tokens=24, concurrency=16, waves=8)
    failed = [r for r in results if not _complete(r, 24)]
    assert not failed, f"{len(failed)} of {len(results)} streams failed, e.g. {failed[:3]}"


def test_a_stream_longer_than_the_model_service_timeout_completes(split):
    # 32 streams of up to 480 tokens decoding together (the chat model's context is 512): seconds each.
    results = _streams(split.url, "chat", max_tokens=480, concurrency=32)
    failed = [r for r in results if not _complete(r, 480)]
    assert not failed, f"{len(failed)} of {len(results)} streams failed, e.g. {failed[:3]}"
    assert max(r["seconds"] for r in results) > MODEL_TIMEOUT_SECONDS  # the mechanism was really exercised
    # Most run to their 480 tokens (a cut stream never does): 27 of 32 were cut before the fix.
    assert sum(r["finish"] == "length" for r in results) >= len(results) // 2, results

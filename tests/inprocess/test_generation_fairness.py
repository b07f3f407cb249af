"""Generation shared fairly (issue: one caller's request could hold 256 of a worker's 288 sequences, first in
first out, and a sequence queued for its prefill counted as a stalled model): a cap per request, a bound per
caller, round-robin admission by caller, and queued sequences heard from while they wait."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest
from helpers import post

from bentoformers.runtime.generation import Sampling


@pytest.fixture(scope="module")
def gpt2(client):
    import service

    inner = service.Gateway.inner
    return inner._asgi.state.models["gpt2"].scheduler, inner._asgi.state.chooser.models["gpt2"]


def test_a_request_asks_for_a_bounded_number_of_sequences(client, gpt2):
    _, endpoint = gpt2
    limit = endpoint.settings.max_sequences_per_request
    prompts = ["The cat sat on"] * 16
    r = post(client, "/v1/completions", {"model": "gpt2", "prompt": prompts, "n": 16, "max_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt", r.text
    assert f"at most {limit} per request" in r.json()["error"]["message"]
    r = post(client, "/v1/completions", {"model": "gpt2", "prompt": prompts[:2], "n": limit // 2, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert endpoint.generating == 0 and not endpoint.generating_by_caller


def test_a_caller_has_a_bounded_number_of_sequences_generating(client, gpt2, monkeypatch):
    scheduler, endpoint = gpt2
    monkeypatch.setattr(endpoint, "settings", endpoint.settings.model_copy(update={"max_sequences_per_caller": 3}))
    step = scheduler.decoder.step

    def slow_step(*args):  # the real step, slowed so the first generation is still running
        time.sleep(0.01)
        return step(*args)

    monkeypatch.setattr(scheduler.decoder, "step", slow_step)
    body = {"model": "gpt2", "prompt": "The cat sat on", "n": 2, "max_tokens": 60, "temperature": 1.0, "seed": 3}
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as first:
        assert first.status_code == 200
        next(first.iter_lines())  # generating: 2 of this caller's 3
        second = post(client, "/v1/completions", body)
        assert second.status_code == 429 and second.headers["retry-after"], second.text
        assert second.json()["error"]["type"] == "rate_limit_error"
    deadline = time.monotonic() + 10  # the stream left: its sequences are released as its generation closes
    while endpoint.generating_by_caller and time.monotonic() < deadline:
        time.sleep(0.05)
    assert post(client, "/v1/completions", body | {"max_tokens": 2}).status_code == 200


def test_waiting_sequences_are_admitted_round_robin_by_caller(client, gpt2, monkeypatch):
    scheduler, _ = gpt2
    monkeypatch.setattr(scheduler, "max_active", 1)

    async def order_of_admission():
        admitted: list[str] = []

        async def run(name: str, caller: str, tokens: int) -> None:
            async for kind, _ in scheduler.generate([5, 6, 7], tokens, Sampling(), caller=caller):
                if kind == "token" and name not in admitted:
                    admitted.append(name)

        first = asyncio.create_task(run("a1", "alice", 20))
        await asyncio.sleep(0.05)  # decoding: the one place is taken
        rest = [asyncio.create_task(run(n, c, 2)) for n, c in [("a2", "alice"), ("a3", "alice"), ("b1", "bob")]]
        await asyncio.gather(first, *rest)
        return admitted

    # First in first out would give a1 a2 a3 b1: bob waited behind every one of alice's.
    assert client.portal.call(order_of_admission) == ["a1", "b1", "a2", "a3"]


def test_a_queued_sequence_is_not_taken_for_a_stalled_model(client, gpt2, monkeypatch):
    scheduler, endpoint = gpt2
    monkeypatch.setattr(scheduler, "max_active", 1)
    monkeypatch.setattr(scheduler, "waiting_note_seconds", 0.1)
    monkeypatch.setattr(endpoint, "settings", endpoint.settings.model_copy(update={"stream_idle_timeout_seconds": 0.5}))
    step = scheduler.decoder.step

    def slow_step(*args):
        time.sleep(0.02)
        return step(*args)

    monkeypatch.setattr(scheduler.decoder, "step", slow_step)
    long = {"model": "gpt2", "prompt": "The cat sat on", "max_new_tokens": 60, "temperature": 1.0, "seed": 5}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, client, "/generate", long)
        time.sleep(0.2)  # the one place taken for about 1.2 s: the next waits past the 0.5 s idle bound
        second = pool.submit(post, client, "/generate", long | {"max_new_tokens": 2})
        assert first.result().status_code == 200
        r = second.result()
    assert r.status_code == 200, r.text  # was: 504, "the model service sent nothing for 0.5s"

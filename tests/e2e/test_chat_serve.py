"""Chat completions on a real `bentoml serve` with the chat model beside the others: the OpenAI SDK, curl -N,
the Python client; concurrency, a client that leaves, a reader that stalls; and a token budget that
generation cannot pass, across 2 gateway workers sharing a real Redis."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from chat_reference import CONVERSATIONS, expected_greedy
from helpers import RedisServer, running_server

import bentoformers


@pytest.fixture(scope="module")
def chat_folder(served_build):
    import bentoml

    return bentoml.models.get(served_build["chat"]["fp32"].tag).path


@pytest.fixture(scope="module")
def one_token_word(chat_folder):
    """A word the chat model's tokenizer makes one token: a prompt whose cost is known exactly."""
    from bentoformers.runtime.tokenizer import TextTokenizer

    return next(w for w in ("The", "A", "cat") if len(TextTokenizer(chat_folder, 512).ids(w)) == 1)


def test_openai_sdk_chat_completions_whole_and_streamed(server, chat_folder):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = CONVERSATIONS[1]
    text, finish, prompt_tokens = expected_greedy(chat_folder, messages, 20)
    result = client.chat.completions.create(model="chat", messages=messages, max_completion_tokens=20, temperature=0)
    assert result.object == "chat.completion" and result.model == "chat"
    assert result.choices[0].message.role == "assistant" and result.choices[0].message.content == text
    assert result.choices[0].finish_reason == finish and result.usage.prompt_tokens == prompt_tokens

    stream = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=messages, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert caught.value.status_code == 400 and "tools" in str(caught.value)


def test_python_client_chat_and_chat_stream(server, chat_folder):
    messages = CONVERSATIONS[2]
    text, finish, _ = expected_greedy(chat_folder, messages, 16)
    with bentoformers.Client(server, timeout=60) as client:
        result = client.chat(messages, model="chat", max_tokens=16, temperature=0)
        assert result.text == text and result.choices[0].finish_reason == finish
        chunks = list(client.chat_stream(messages, model="chat", max_tokens=16, temperature=0))
        assert "".join(c.text for c in chunks) == text
        assert chunks[-1].finish_reason == finish and chunks[-1].usage == result.usage
        two = client.chat("Hello there", model="chat", max_tokens=8, n=2, temperature=1.0, seed=5)
        assert [c.index for c in two.choices] == [0, 1]

    async def main():
        async with bentoformers.AsyncClient(server) as client:
            whole = await client.chat(messages, model="chat", max_tokens=16, temperature=0)
            streamed = [c async for c in client.chat_stream(messages, model="chat", max_tokens=16, temperature=0)]
            return whole, streamed

    whole, streamed = asyncio.run(main())
    assert whole.text == text and "".join(c.text for c in streamed) == text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_chat_chunks(server, chat_folder):
    messages = CONVERSATIONS[0]
    text, _, _ = expected_greedy(chat_folder, messages, 12)
    body = json.dumps({"model": "chat", "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True})
    out = subprocess.run(
        ["curl", "-sN", f"{server}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    events = [e.removeprefix("data: ") for e in out.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


def test_the_cli_chats_with_a_message_or_turns_from_stdin(server, chat_folder):
    text, _, _ = expected_greedy(chat_folder, CONVERSATIONS[0], 12)
    command = [sys.executable, "-m", "bentoformers.cli", "chat", "--url", server, "--max-tokens", "12",
               "--temperature", "0"]
    done = subprocess.run([*command, CONVERSATIONS[0][0]["content"]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == text + "\n", done.stderr  # the chat model, without --model
    turns = "The cat sat on\nAnd then?\n"
    done = subprocess.run([*command, "--model", "chat"], input=turns, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(text + "\n"), (done.stdout, done.stderr)
    assert done.stdout.endswith("\n") and len(done.stdout) > len(text) + 2  # a second answer, to the second turn
    done = subprocess.run([*command, "--model", "gpt2", "hi"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no chat template" in done.stderr


def test_eight_concurrent_greedy_conversations_over_http_get_what_they_get_alone(server, chat_folder):
    expected = [expected_greedy(chat_folder, m, 24)[0] for m in CONVERSATIONS]

    def one(messages):
        r = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                       json={"model": "chat", "messages": messages, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
        assert list(pool.map(one, CONVERSATIONS)) == expected


def _metric(server: str, name: str) -> float:
    prefix = f'{name}{{model="chat"}}'
    lines = [ln for ln in httpx.get(f"{server}/metrics").text.splitlines() if ln.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def _wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_client_that_leaves_frees_its_sequence_at_once(server):
    assert _wait_for(lambda: _metric(server, "bentoformers_generation_sequences") == 0)
    before = _metric(server, "bentoformers_generated_tokens_total")
    body = {"model": "chat", "messages": [{"role": "user", "content": "Tell"}], "max_tokens": 480,
            "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(4), lines) if line.startswith("data:")) >= 2
    # The connection is closed: the sequence leaves the batch at the next step, long before its 480 tokens.
    assert _wait_for(lambda: _metric(server, "bentoformers_generation_sequences") == 0)
    time.sleep(0.5)  # let a sequence that was not stopped run on, so the count below would show it
    generated = _metric(server, "bentoformers_generated_tokens_total") - before
    assert 1 <= generated < 480, generated


def test_a_reader_that_stalls_holds_no_one_else(server, chat_folder):
    """A stream nobody reads keeps its sequence (its tokens wait in buffers), while others decode and finish."""
    stalled_body = {"model": "chat", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 400,
                    "temperature": 1.0, "seed": 2, "stream": True}
    text, _, _ = expected_greedy(chat_folder, CONVERSATIONS[3], 24)
    with httpx.Client(timeout=60) as stalled, stalled.stream("POST", f"{server}/v1/chat/completions",
                                                              json=stalled_body) as r:
        assert r.status_code == 200
        for _ in range(3):  # the stall begins after the first events arrive
            r = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                           json={"model": "chat", "messages": CONVERSATIONS[3], "max_tokens": 24, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text


def test_a_two_tokens_per_minute_tier_cannot_be_exceeded_by_generation(one_token_word, tmp_path_factory):
    word = one_token_word
    work = tmp_path_factory.mktemp("budget")
    redis = RedisServer(work)
    redis.start()
    env = {
        **os.environ,
        "BENTOML_CONFIG_OPTIONS": "services.bentoformers.workers=2 services.bentoformers.logging.access.enabled=true",
        "BENTOFORMERS_REDIS_URL": redis.url,
        "BENTOFORMERS_RATE_LIMIT_TIERS": '{"default": {"tokens": "2/minute"}}',
        "BENTOFORMERS_MODELS": "chat",
    }
    try:
        with running_server([sys.executable, "-m", "bentoml", "serve", "service:Gateway"], work / "serve.log", env) as s:
            url = s.url
            # Over the whole budget (1 prompt token + up to 5 new): waiting would not help.
            r = httpx.post(f"{url}/v1/completions", json={"prompt": word, "max_tokens": 5}, timeout=60)
            assert r.status_code == 413, r.text
            assert "up to 5 new" in r.json()["error"]["message"]
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 1}, timeout=60)
            assert r.status_code == 413

            def workers_seen() -> set[str]:
                # BentoML's text access log names the worker that answered: "[...:<worker>] <client address>".
                lines = [ln for ln in s.log.read_text().splitlines() if "path=/v1/completions" in ln]
                return {m.group(1) for ln in lines if (m := re.search(r"\[[^\]\s]*:(\d+)\] ", ln))}

            async def one(i):  # a fresh connection each, so both workers take some
                async with httpx.AsyncClient(timeout=60) as client:
                    return await client.post(f"{url}/v1/completions", json={
                        "prompt": word, "max_tokens": 1, "temperature": 1.0, "seed": i, "stream": i % 2 == 1})

            responses = []
            for group in range(20):  # until both workers have answered some (which one accepts is the kernel's choice)
                responses += asyncio.run(_gather(one, range(3 * group, 3 * group + 3)))
                time.sleep(0.3)  # the workers' access-log lines land asynchronously
                if group >= 3 and workers_seen() == {"1", "2"}:
                    break
            assert workers_seen() == {"1", "2"}, "both workers took requests"
            codes = [r.status_code for r in responses]
            assert codes.count(200) == 1 and codes.count(429) == len(codes) - 1, codes
            refused = next(r for r in responses if r.status_code == 429)
            assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) > 0
            assert refused.headers["ratelimit-limit"] == "2" and refused.headers["ratelimit-remaining"] == "0"
    finally:
        redis.stop()


def test_generations_refused_for_capacity_are_not_charged(one_token_word, tmp_path_factory):
    """The capacity check and its count are one step: six concurrent completions on a model with room for one
    sequence, while each charge waits on Redis, get one 200 and five 503s, and the 503s cost nothing (before,
    all six passed the check, were charged, and then five were refused: the next request got 429)."""
    word = one_token_word
    work = tmp_path_factory.mktemp("capacity")
    redis = RedisServer(work)
    redis.start()
    env = {
        **os.environ,
        "BENTOFORMERS_REDIS_URL": redis.url,
        # Each request costs 1 prompt token + 100 it may generate: two fit in the budget, a third does not.
        "BENTOFORMERS_RATE_LIMIT_TIERS": '{"default": {"tokens": "250/minute"}}',
        "BENTOFORMERS_MODELS": "chat", "BENTOFORMERS_MAX_ACTIVE_SEQUENCES": "1",
        "BENTOFORMERS_MAX_WAITING_SEQUENCES": "0",
    }
    body = {"prompt": word, "max_tokens": 100, "temperature": 1.0, "seed": 1}
    try:
        with running_server([sys.executable, "-m", "bentoml", "serve", "service:Gateway"], work / "serve.log", env) as s:
            async def one(i):
                async with httpx.AsyncClient(timeout=60) as client:
                    return await client.post(f"{s.url}/v1/completions", json=body)

            codes = [r.status_code for r in asyncio.run(_gather(one, range(6)))]
            after = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
    finally:
        redis.stop()
    print(f"\n6 concurrent completions, room for 1 sequence: {sorted(codes)}; the next one: {after.status_code}")
    assert sorted(codes) == [200, 503, 503, 503, 503, 503], codes
    assert after.status_code == 200, after.text  # 101 of 250 tokens charged so far, not 202


async def _gather(call, items):
    return await asyncio.gather(*(call(i) for i in items))

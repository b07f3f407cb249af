"""POST /generate and /v1/completions in process, on the tiny GPT-2 the tests build (`gpt2`)."""

from __future__ import annotations

import asyncio
import concurrent.futures

import orjson
import pytest
from helpers import post

PROMPTS = ["The cat sat on", "Rain fell over the", "She opened the door and", "A good", "Numbers like 42 and"]


@pytest.fixture(scope="module")
def scheduler(client):
    import service

    return service.Gateway.inner._asgi.state.models["gpt2"].scheduler


def generate(client, body):
    r = post(client, "/generate", body)
    assert r.status_code == 200, r.text
    return r.json()


def events(text):
    out = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert out[-1] == "[DONE]", out[-3:]
    return [orjson.loads(e) for e in out[:-1]]


def test_greedy_generation_is_the_built_decoders_greedy_continuation(client, served_build):
    import bentoml

    from bentoformers.runtime.card import ModelCard
    from bentoformers.runtime.decoder import OnnxDecoder
    from bentoformers.runtime.tokenizer import TextTokenizer

    # The tests serve gpt2 in fp32 (conftest): the precision whose greedy tokens batching cannot change.
    folder = bentoml.models.get(served_build["gpt2"]["fp32"].tag).path
    tokenizer = TextTokenizer(folder, 128)
    body = generate(client, {"prompt": PROMPTS[0], "max_new_tokens": 12, "model": "gpt2"})
    expected = OnnxDecoder(folder).greedy(tokenizer.ids(PROMPTS[0]), 12, ModelCard.load(folder).eos_token_ids)
    assert body["model"] == "gpt2"
    stream = tokenizer.decode_stream()
    assert body["text"] == "".join(stream.step(t) for t in expected if t != 0)
    prompt_tokens = len(tokenizer.ids(PROMPTS[0]))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected),
                             "total_tokens": prompt_tokens + len(expected)}
    assert body["finish_reason"] == ("stop" if expected[-1] == 0 else "length")


def test_concurrent_greedy_requests_decode_together_and_get_the_answers_they_get_alone(client, scheduler):
    alone = [generate(client, {"prompt": p, "max_new_tokens": 24})["text"] for p in PROMPTS]
    steps, rows = scheduler.steps, scheduler.rows_stepped
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: generate(client, {"prompt": p, "max_new_tokens": 24})["text"], PROMPTS))
    assert together == alone
    # Batched: the decoding steps held several sequences at once.
    assert (scheduler.rows_stepped - rows) > 1.5 * (scheduler.steps - steps)


def test_streaming_sends_one_event_per_token_then_the_finish_and_done(client):
    whole = generate(client, {"prompt": PROMPTS[1], "max_new_tokens": 16})
    r = post(client, "/generate", {"prompt": PROMPTS[1], "max_new_tokens": 16, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = events(r.text)
    *deltas, last = data
    assert "".join(d["text"] for d in deltas) == whole["text"]
    assert len(deltas) >= whole["usage"]["completion_tokens"] // 2
    assert last == {"text": "", "finish_reason": whole["finish_reason"], "usage": whole["usage"]}


def test_a_stop_string_ends_the_text_before_it(client):
    whole = generate(client, {"prompt": PROMPTS[2], "max_new_tokens": 32})["text"]
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert stop.strip(), whole
    cut = generate(client, {"prompt": PROMPTS[2], "max_new_tokens": 32, "stop": [stop, "\u2603never"]})
    assert cut["text"] == whole[: whole.index(stop)] and cut["finish_reason"] == "stop"
    r = post(client, "/generate", {"prompt": PROMPTS[2], "max_new_tokens": 32, "stop": stop, "stream": True})
    *deltas, last = events(r.text)
    assert "".join(d["text"] for d in deltas) == cut["text"] and last["finish_reason"] == "stop"


def test_sampling_with_a_seed_is_reproducible(client):
    body = {"prompt": PROMPTS[3], "max_new_tokens": 16, "temperature": 1.5, "top_p": 0.95, "top_k": 50, "seed": 7}
    assert generate(client, body)["text"] == generate(client, body)["text"]
    texts = {generate(client, {**body, "seed": s})["text"] for s in range(6)}
    assert len(texts) > 1


def test_openai_completions_shape_and_stream(client):
    r = post(client, "/v1/completions", {"model": "gpt2", "prompt": PROMPTS[4], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "gpt2"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 8
    r = post(client, "/v1/completions", {"prompt": [PROMPTS[4]], "max_tokens": 8, "temperature": 0, "stream": True,
                                         "stream_options": {"include_usage": True}})
    chunks = events(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert chunks[-1]["usage"] == body["usage"] and chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_the_context_bounds_the_generation(client):
    body = generate(client, {"prompt": "word " * 58, "max_new_tokens": 64, "temperature": 1.0, "seed": 1})
    assert body["usage"]["prompt_tokens"] > 100 and body["usage"]["total_tokens"] <= 128


def test_a_consumer_that_goes_away_stops_its_sequence(client, scheduler):
    from bentoformers.runtime.generation import Sampling

    async def take_two_then_leave():
        stream = scheduler.generate([5, 6, 7], 100, Sampling(temperature=1.0, seed=3))
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        before = scheduler.steps
        await asyncio.sleep(0.2)
        return got, scheduler.steps - before, len(scheduler._active)

    got, steps_after, active = client.portal.call(take_two_then_leave)
    assert [kind for kind, _ in got] == ["token", "token"]
    assert steps_after <= 2 and active == 0


def test_a_cancel_that_overtakes_its_generation_still_stops_it(client, scheduler):
    from bentoformers.runtime.generation import Sampling

    async def cancel_then_generate():
        assert scheduler.cancel("early-key") is False  # not here yet: remembered
        events = [e async for _, e in _each(scheduler.generate_n([5, 6, 7], 100, [Sampling(1.0, seed=3)] * 2,
                                                                  "early-key"))]
        alone = [e async for e in scheduler.generate([5, 6, 7], 3, Sampling(temperature=0.0), "another-key")]
        return events, alone

    events, alone = client.portal.call(cancel_then_generate)
    assert events == [("finish", "cancelled")] * 2  # both choices, without a token decoded
    assert [kind for kind, _ in alone] == ["token"] * 3 + ["finish"]  # other keys are untouched


async def _each(choices):
    async for index, kind, value in choices:
        yield index, (kind, value)


def test_the_model_sides_waiting_queue_is_bounded(client, scheduler, monkeypatch):
    """Every gateway bounds its own generations, but several share one model service: with its active places
    taken and its waiting bound reached, a new sequence ends at once with "overloaded", which the gateway
    answers as 503 + Retry-After."""
    from bentoformers.runtime.generation import Sampling

    monkeypatch.setattr(scheduler, "max_active", 1)
    monkeypatch.setattr(scheduler, "max_waiting", 0)

    async def second_while_one_decodes():
        first = scheduler.generate([5, 6, 7], 100, Sampling(temperature=1.0, seed=1))
        await anext(first)  # decoding: the one active place is taken
        second = [e async for e in scheduler.generate([5, 6, 7], 3, Sampling(temperature=0.0))]
        await first.aclose()
        third = [e async for e in scheduler.generate([5, 6, 7], 3, Sampling(temperature=0.0))]
        return second, third

    second, third = client.portal.call(second_while_one_decodes)
    assert second == [("finish", "overloaded")]
    assert [kind for kind, _ in third] == ["token"] * 3 + ["finish"]  # the place is free again
    monkeypatch.setattr(scheduler, "max_active", 0)  # no place at all: what the gateway makes of it
    r = client.post("/generate", json={"model": "gpt2", "prompt": "hello", "max_new_tokens": 3})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["type"] == "overloaded_error"


def test_a_client_that_disconnects_mid_stream_stops_its_generation(client, scheduler, monkeypatch, caplog):
    """Drives the ASGI app as a server would: the client goes away after two events."""
    import logging
    import time


    step = scheduler.decoder.step

    def slow_step(*args):  # the real step, slowed so the whole generation cannot finish before the disconnect
        time.sleep(0.005)
        return step(*args)

    monkeypatch.setattr(scheduler.decoder, "step", slow_step)
    body = orjson.dumps({"prompt": PROMPTS[0], "max_new_tokens": 100, "temperature": 1.0, "seed": 11, "stream": True})

    async def run():
        app = client.app
        gone = asyncio.Event()
        sent = []
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body")) >= 2:
                gone.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/generate", "raw_path": b"/generate", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        await asyncio.wait_for(app(scope, receive, send), 10)
        await asyncio.sleep(0.1)
        return sent

    with caplog.at_level(logging.INFO, logger="bentoformers"):
        sent = client.portal.call(run)
    assert sent[0]["status"] == 200
    stopped = [r.getMessage() for r in caplog.records if "whose client went away" in r.getMessage()]
    assert stopped, [r.getMessage() for r in caplog.records]
    assert int(stopped[0].rsplit("after ", 1)[1].split()[0]) < 100
    assert not scheduler._active


BAD = [
    ("/generate", {"prompt": ""}, 422, "validation_error", "prompt"),
    ("/generate", {"prompt": "   "}, 422, "validation_error", "prompt"),
    ("/generate", {"prompt": "hi", "max_new_tokens": 100_000}, 422, "validation_error", "max_new_tokens"),
    ("/generate", {"prompt": "hi", "max_new_tokens": 0}, 422, "validation_error", "max_new_tokens"),
    ("/generate", {"prompt": "hi", "temperature": -1}, 422, "validation_error", "temperature"),
    ("/generate", {"prompt": "hi", "top_p": 0}, 422, "validation_error", "top_p"),
    ("/generate", {"prompt": "hi", "temperature": 1, "seed": -1}, 422, "validation_error", "seed"),
    ("/generate", {"prompt": "hi", "stop": [""]}, 422, "validation_error", "stop"),
    ("/generate", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "validation_error", "stop"),
    ("/generate", {"prompt": ["hi"]}, 422, "validation_error", "prompt"),
    ("/generate", {"prompt": "hi", "model": "minilm"}, 400, "invalid_request_error", "model"),
    ("/generate", {"prompt": "hi", "model": "nope"}, 404, "not_found_error", "model"),
    ("/generate", {"prompt": "word " * 200}, 413, "request_too_large", "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100_000}, 422, "validation_error", "max_tokens"),
    ("/v1/completions", {"prompt": []}, 422, "validation_error", "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 17}, 422, "validation_error", "prompt"),
    ("/v1/completions", {"prompt": ["a", "word " * 200]}, 413, "request_too_large", "prompt.1"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 422, "validation_error", "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 422, "validation_error", "n"),
    ("/v1/completions", {"prompt": "hi", "model": "sentiment"}, 400, "invalid_request_error", "model"),
]


@pytest.mark.parametrize("route,body,status,kind,param", BAD)
def test_bad_generation_requests_get_the_one_error_body(client, route, body, status, kind, param):
    for stream in (False, True):
        r = post(client, route, {**body, "stream": stream})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == kind and error["param"] == param and error["message"]


def test_the_default_new_tokens_never_pass_the_servers_limit(served_build):
    import bentoml

    from bentoformers.api.generation import plan_generation
    from bentoformers.gateway.endpoint import GeneratorEndpoint
    from bentoformers.runtime.generation import Sampling
    from bentoformers.settings import Settings

    folder = bentoml.models.get(served_build["gpt2"]["fp32"].tag).path
    settings = Settings(max_new_tokens=8, default_max_new_tokens=64)
    endpoint = GeneratorEndpoint(settings, folder, describe=None, stream=None, cancel=None)
    plan = asyncio.run(plan_generation(endpoint, "The cat sat on", None, "max_new_tokens", Sampling(), None))
    assert plan.max_new_tokens == 8

"""The client's own logic (error mapping, retries, stream parsing) against scripted HTTP answers.

The answers are what the server sends (see tests/inprocess/test_client.py and tests/e2e for the real one);
scripting them is the only way to make a server answer 429 twice and then 200 on cue.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bentoformers import client as bf

EMBED_OK = {"model": "m", "embeddings": [[1.0, 0.0]], "usage": {"prompt_tokens": 3, "total_tokens": 3}}


def scripted(*answers):
    """A transport that gives the answers in turn (an exception instance is raised) and records requests."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), seen


def error(status, kind="x_error", message="m", param=None, headers=None):
    return httpx.Response(status, json={"error": {"type": kind, "message": message, "param": param}}, headers=headers)


@pytest.mark.parametrize(
    "status,cls",
    [
        (400, bf.BadRequestError),
        (422, bf.BadRequestError),
        (413, bf.RequestTooLargeError),
        (401, bf.AuthenticationError),
        (403, bf.PermissionDeniedError),
        (404, bf.NotFoundError),
        (409, bf.BadRequestError),
        (500, bf.ServerError),
        (504, bf.ServerError),
    ],
)
def test_status_maps_to_exception_keeping_the_servers_fields(status, cls):
    answer = error(status, "some_type", "say what to do", "inputs.1", headers={"X-Request-ID": "rid"})
    transport, seen = scripted(answer)
    with bf.Client("http://s", transport=transport) as c, pytest.raises(cls) as caught:
        c.embed("x")
    exc = caught.value
    assert (exc.status_code, exc.type, exc.message, exc.param, exc.request_id) == (
        status, "some_type", "say what to do", "inputs.1", "rid"
    )
    assert "say what to do" in str(exc) and "inputs.1" in str(exc)
    assert len(seen) == 1  # not retried


@pytest.mark.parametrize(
    "body,message",
    [
        ([{"error": "Too many requests"}], "Too many requests"),  # BentoML's list body
        ({"error": "Not able to process the request in 60 seconds"}, "Not able to process the request in 60 seconds"),
        ("upstream exploded", "upstream exploded"),
    ],
)
def test_foreign_error_bodies_still_give_a_message(body, message):
    answer = httpx.Response(500, json=body) if not isinstance(body, str) else httpx.Response(500, text=body)
    transport, _ = scripted(answer)
    with bf.Client("http://s", transport=transport) as c, pytest.raises(bf.ServerError) as caught:
        c.embed("x")
    assert caught.value.message == message


def test_429_and_503_are_retried_honouring_retry_after():
    transport, seen = scripted(
        error(429, "rate_limit_error", headers={"Retry-After": "0"}),
        error(503, "overloaded_error", headers={"Retry-After": "0"}),
        httpx.Response(200, json=EMBED_OK),
    )
    with bf.Client("http://s", transport=transport) as c:
        assert c.embed("x").embeddings == [[1.0, 0.0]]
    assert len(seen) == 3


def test_gives_up_when_retry_after_is_beyond_the_retry_budget():
    transport, seen = scripted(error(429, "rate_limit_error", "slow down", headers={"Retry-After": "30"}))
    with bf.Client("http://s", transport=transport, retry_timeout=5) as c, pytest.raises(bf.RateLimitError) as caught:
        c.embed("x")
    assert caught.value.retry_after == 30 and len(seen) == 1


def test_gives_up_after_max_retries():
    transport, seen = scripted(error(503, "overloaded_error", headers={"Retry-After": "0"}))
    with bf.Client("http://s", transport=transport, max_retries=2) as c, pytest.raises(bf.OverloadedError):
        c.embed("x")
    assert len(seen) == 3


def test_connection_errors_are_retried_then_raised():
    transport, seen = scripted(httpx.ConnectError("refused"), httpx.Response(200, json=EMBED_OK))
    with bf.Client("http://s", transport=transport) as c:
        c.embed("x")
    assert len(seen) == 2
    transport, seen = scripted(httpx.ConnectError("refused"))
    with bf.Client("http://s", transport=transport, max_retries=1) as c, pytest.raises(bf.APIConnectionError) as caught:
        c.embed("x")
    assert not isinstance(caught.value, bf.APITimeoutError) and len(seen) == 2


def test_a_read_timeout_is_not_retried():
    transport, seen = scripted(httpx.ReadTimeout("slow"))
    with bf.Client("http://s", transport=transport) as c, pytest.raises(bf.APITimeoutError):
        c.embed("x")
    assert len(seen) == 1


def test_bearer_token_and_user_agent_are_sent():
    transport, seen = scripted(httpx.Response(200, json=EMBED_OK))
    with bf.Client("http://s/", api_key="k-123", transport=transport) as c:
        c.embed("x", truncate=True)
    request = seen[0]
    assert request.url == "http://s/embed"
    assert request.headers["authorization"] == "Bearer k-123"
    assert request.headers["user-agent"].startswith("bentoformers-python/")
    assert request.read() == b'{"inputs":["x"],"truncate":true}'


def test_long_lists_are_split_at_the_servers_advertised_limit():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "max_items_per_request": 2}]})
        texts = httpx.Response(200, content=request.read()).json()["inputs"]
        if len(texts) > 2:
            return error(413, "request_too_large")
        n = len(texts)
        return httpx.Response(200, json={
            "model": "m", "embeddings": [[float(t)] for t in texts], "usage": {"prompt_tokens": n, "total_tokens": n},
        })

    with bf.Client("http://s", transport=httpx.MockTransport(handler)) as c:
        result = c.embed([str(i) for i in range(5)])
        assert c.max_items_per_request() == 2
    assert result.embeddings == [[0.0], [1.0], [2.0], [3.0], [4.0]]
    assert result.usage.total_tokens == 5


def test_rerank_splits_long_lists_and_merges_them_best_first():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = httpx.Response(200, content=request.read()).json()
        bodies.append(body)
        scores = [float(t) for t in body["texts"]]  # the scripted score of a text is its value
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return httpx.Response(200, json=[{"index": i, "score": scores[i]} for i in ranked])

    with bf.Client("http://s", transport=httpx.MockTransport(handler), max_items_per_request=2) as c:
        results = c.rerank("q", ["0.1", "0.9", "0.5", "0.7", "0.3"], top_n=3, raw_scores=True)
    assert [(r.index, r.score) for r in results] == [(1, 0.9), (3, 0.7), (2, 0.5)]
    assert [b["texts"] for b in bodies] == [["0.1", "0.9"], ["0.5", "0.7"], ["0.3"]]
    assert all(b["query"] == "q" and b["raw_scores"] is True and "return_text" not in b for b in bodies)

    async def main():
        async with bf.AsyncClient("http://s", transport=httpx.MockTransport(handler), max_items_per_request=2) as c:
            return await c.rerank("q", ["0.1", "0.9", "0.5"])

    assert [r.index for r in asyncio.run(main())] == [1, 2, 0]


SSE = (
    'data: {"text": "Hel"}\n\n'
    'data: {"text": "lo"}\n\n'
    'data: {"text": "", "finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}\n\n'
    "data: [DONE]\n\n"
)


def test_stream_yields_chunks_then_stops_at_done():
    transport, seen = scripted(httpx.Response(200, text=SSE, headers={"content-type": "text/event-stream"}))
    with bf.Client("http://s", transport=transport) as c:
        chunks = list(c.generate_stream("hi", max_new_tokens=2, temperature=0))
    assert "".join(ch.text for ch in chunks) == "Hello"
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.total_tokens == 4
    assert httpx.Response(200, content=seen[0].read()).json() == {
        "prompt": "hi", "max_new_tokens": 2, "temperature": 0, "stream": True
    }


def test_an_error_inside_the_stream_is_raised_by_type():
    body = 'data: {"text": "a"}\n\ndata: {"error": {"type": "overloaded_error", "message": "busy", "param": null}}\n\n'
    transport, _ = scripted(httpx.Response(200, text=body, headers={"content-type": "text/event-stream"}))
    with bf.Client("http://s", transport=transport) as c, pytest.raises(bf.OverloadedError, match="busy") as caught:
        list(c.generate_stream("hi"))
    assert caught.value.type == "overloaded_error" and caught.value.status_code == 200


def test_async_client_retries_and_streams():
    async def main():
        transport, seen = scripted(
            error(503, "overloaded_error", headers={"Retry-After": "0"}),
            httpx.Response(200, text=SSE, headers={"content-type": "text/event-stream"}),
        )
        async with bf.AsyncClient("http://s", transport=transport) as c:
            chunks = [ch async for ch in c.generate_stream("hi")]
        return chunks, seen

    chunks, seen = asyncio.run(main())
    assert "".join(ch.text for ch in chunks) == "Hello" and len(seen) == 2


@pytest.mark.parametrize("value,expected", [("3", 3.0), ("0.5", 0.5), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
                                            ("soon", None), ("", None)])
def test_retry_after_in_seconds_or_as_a_date(value, expected):
    assert bf.parse_retry_after(value) == expected


def test_api_key_and_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("BENTOFORMERS_URL", "http://env-host:9")
    monkeypatch.setenv("BENTOFORMERS_API_KEY", "from-env")
    c = bf.Client()
    assert c.base_url == "http://env-host:9" and c.headers["Authorization"] == "Bearer from-env"
    c.close()

"""How the gateway meets a failing model service: which failures are worth a retry, and the one reconnect."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import pytest
from bentoml.exceptions import BentoMLException, ServiceUnavailable

from bentoformers.gateway.endpoint import _reopened, unavailable_error
from bentoformers.gateway.health import ModelHealth


@pytest.mark.parametrize("exc,retryable", [
    (aiohttp.ClientConnectionError("Connector is closed."), True),  # BentoML's dependency client (aiohttp)
    (aiohttp.ServerDisconnectedError(), True),
    (httpx.ConnectError("refused"), True),
    (ConnectionRefusedError(), True),
    (TimeoutError(), True),
    (ServiceUnavailable("shed"), True),
    (BentoMLException("busy", error_code=429), True),
    (BentoMLException("model service bug", error_code=500), False),
    (ValueError("a bug"), False),
    (KeyError("a bug"), False),
])
def test_only_an_unreachable_or_shedding_model_service_is_worth_a_retry(exc, retryable):
    assert unavailable_error(exc) is retryable


def test_a_stream_whose_connection_was_closed_under_it_is_opened_once_more():
    opened = []

    async def stream(fail: bool):
        if fail:
            raise aiohttp.ClientConnectionError("Connector is closed.")
        for chunk in ("1\n", "2\n", "stop\n"):
            yield chunk

    def open_stream():
        opened.append(len(opened))
        return stream(fail=len(opened) == 1)

    async def run():
        return [chunk async for chunk in _reopened(open_stream)]

    assert asyncio.run(run()) == ["1\n", "2\n", "stop\n"] and opened == [0, 1]

    def always_closed():
        return stream(fail=True)

    async def fails():
        return [chunk async for chunk in _reopened(always_closed)]

    with pytest.raises(aiohttp.ClientConnectionError):  # once more, not forever
        asyncio.run(fails())


def test_a_stream_sent_on_a_keep_alive_connection_the_model_service_had_closed_is_sent_once_more():
    opened = []

    async def stream(fail: bool):
        if fail:  # what aiohttp raises for a request that went out on a connection the server had just closed
            raise aiohttp.ServerDisconnectedError()
        yield "0 5\n"
        yield "0 length\n"

    def open_stream():
        opened.append(len(opened))
        return stream(fail=len(opened) == 1)

    async def run():
        return [chunk async for chunk in _reopened(open_stream)]

    assert asyncio.run(run()) == ["0 5\n", "0 length\n"] and opened == [0, 1]


def test_a_failed_call_marks_the_model_service_down_only_when_its_health_check_fails_too():
    answers = {"ping": True}

    async def ping():
        if not answers["ping"]:
            raise aiohttp.ClientConnectionError("Cannot connect")
        return {}

    async def run():
        health = ModelHealth("m", ping, interval=3600)
        health.failed(aiohttp.ServerDisconnectedError())  # a keep-alive connection it had closed; it answers
        await asyncio.sleep(0.05)
        still_up = not health.down
        answers["ping"] = False
        health.failed(aiohttp.ServerDisconnectedError())  # now it does not answer
        await asyncio.sleep(0.05)
        return still_up, health.down

    assert asyncio.run(run()) == (True, True)


def test_a_model_service_that_has_never_answered_is_starting_not_down():
    """BentoML holds a starting model service's socket, so its first health calls time out. That must not mark
    it down: another gateway worker may already have seen it answer and made the server ready, and this
    worker's requests would get 503 while the model serves. Once it has answered, a timeout is down."""
    answering = asyncio.Event()

    async def ping():
        await answering.wait()
        return {}

    async def run():
        health = ModelHealth("m", ping, interval=0.01, timeout=0.05)
        health.watch()
        await asyncio.sleep(0.2)  # several checks, each timed out
        starting = health.state
        answering.set()
        await asyncio.sleep(0.05)
        up = health.state
        answering.clear()
        await asyncio.sleep(0.2)
        return starting, up, health.state

    assert asyncio.run(run()) == ("unknown", "up", "down")

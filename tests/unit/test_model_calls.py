"""How the gateway meets a failing model service: which failures are worth a retry, and the one reconnect."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import pytest
from bentoml.exceptions import BentoMLException, ServiceUnavailable

from bentoformers.gateway.endpoint import _reopened, unavailable_error


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

"""A deadline for the request head: uvicorn bounds the idle time between requests (keep-alive), but not the time
a client takes to send the request line and headers, nor a connection that sends nothing at all. A client that
sends a header byte every few seconds would hold its socket (and a file descriptor) forever.

Here every connection that is waiting for a request head (just opened, or with a partial head after a
response) has `seconds` to complete it; past that it gets 408 in our error body, with an X-Request-ID, and is
closed (one that sent nothing at all is just closed). No ASGI middleware can do this: the app is called only
once the head is complete.

`bentoml serve` builds uvicorn's config itself (HTTP protocol "auto"), so `install` replaces the class that
"auto" names before the worker's server loads it; the service module is imported before that.
"""

from __future__ import annotations

import asyncio
import uuid

import uvicorn.protocols.http.auto as auto

from bentoformers.errors import ErrorType, error_body
from bentoformers.observability import metrics


def install(seconds: float) -> None:
    """Give every HTTP connection uvicorn's "auto" protocol serves from now on a head deadline of `seconds`."""
    base = getattr(auto.AutoHTTPProtocol, "head_base", auto.AutoHTTPProtocol)
    auto.AutoHTTPProtocol = with_head_deadline(base, seconds)


def with_head_deadline(base: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """`base` (uvicorn's h11 or httptools protocol) with the head deadline."""

    class HeadDeadline(base):  # type: ignore[valid-type, misc]
        head_base = base
        head_seconds = seconds

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_cycle = None  # the request whose head came last
            self._head_bytes = False  # part of a head has come
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._head_cycle:  # a new request's head is complete
                self._head_cycle, self._head_bytes = self.cycle, False
                self._disarm()
            elif self.cycle is None or self.cycle.response_complete:  # part of a head
                self._head_bytes = True
                if self._head_timer is None:
                    self._arm()  # the next request's, after a response (keep-alive stopped counting)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(self.head_seconds, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if (self.transport.is_closing() or self.transport.get_protocol() is not self  # upgraded (WebSocket)
                    or (self.cycle is not None and not self.cycle.response_complete)):
                return
            if not self._head_bytes:  # a connection that never sent a byte: nobody to answer
                self.transport.close()
                return
            metrics.count_rejection("header_timeout")
            body = error_body(ErrorType.TIMEOUT, f"the request head did not arrive within {self.head_seconds:g}s")
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\nx-request-id: %s\r\n\r\n%s"
                % (len(body), uuid.uuid4().hex.encode(), body)
            )
            self.transport.close()

    return HeadDeadline

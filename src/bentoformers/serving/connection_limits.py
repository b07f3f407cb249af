"""Bounds on a connection, in the HTTP protocol itself: the time and size of its request head, and how long its
answer may wait for a client that stopped reading. No ASGI middleware can do these: the app is called only once
the head is complete and parsed, and it cannot see the transport's buffer.

Time: uvicorn bounds the idle time between requests (keep-alive), but not the time a client takes to send the
request line and headers, nor a connection that sends nothing at all. A client that sends a header byte every
few seconds would hold its socket (and a file descriptor) forever. Here every connection that is waiting for a
request head (just opened, or with a partial head after a response) has `seconds` to complete it; past that it
gets 408 in our error body, with an X-Request-ID, and is closed (one that sent nothing at all is just closed).

Size: httptools grows a header value by concatenation on every read (quadratic in the pieces: 6 s of CPU for
an 8 MB header sent in 4 KiB pieces), and h11 answers a head past its own bound with a plain-text 400. Here
the bytes of a head are counted as they come; past `max_bytes` the connection gets 431 in our error body and
nothing more is parsed, so a head costs at most `max_bytes` and one read.

After such an answer the connection's write side is shut and what the client still sends is read and dropped
for a moment before closing (a lingering close, as nginx does): closing with unread bytes would reset the
connection, and a client still sending its head would lose the answer.

Writing: uvicorn awaits the transport's drain with no bound, so a client that stops reading would hold its
request's slot (and a generation's reserved sequences) for ever, and an unread answer would sit in the
transport. Here a connection whose writing stays paused (its buffer over the high-water mark) for
`write_stall_seconds` is aborted: the buffered answer is dropped, and the app sees the client gone (a stream
ends and releases what it holds). A client that reads, however slowly, resumes the writing and is never cut.

Refusing: a 503 with Retry-After is answered at once, and then the connection's next request is not read
until that many seconds have passed (at most `MAX_HOLD_SECONDS`). A client that honours Retry-After never
notices; one that sends again at once waits on its own connection instead of costing the server a parse, a
trip through every layer and another refusal each time (at 256 such clients on two cores, ~2,300 refusals a
second took a third of the CPU that would have served). Keep-alive does not count the hold, and a request that
was waiting in it when it ended is marked with how long (scope[HELD_SCOPE_KEY]: the queue's promise counts it).
Not held: 429s (one client's), and connections from `trusted_proxies`: a proxy's pooled connection carries
other clients' requests, which a hold would stall. A hold is at most MAX_HOLD_SECONDS, within the gateway's
drain grace at shutdown (serving/composition.py), so a request waiting in it is still read and answered.

`bentoml serve` builds uvicorn's config itself (HTTP protocol "auto"), so `install` replaces the class that
"auto" names before the worker's server loads it; the service module is imported before that.
"""

from __future__ import annotations

import asyncio
import math
import select
import uuid

import h11
import uvicorn.protocols.http.auto as auto

from bentoformers.client import parse_retry_after
from bentoformers.errors import ErrorType, error_body
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.observability import metrics
from bentoformers.observability.tracing import HELD_SCOPE_KEY

MAX_HOLD_SECONDS = 2.0  # after a 503: the longest its connection's next request waits to be read
LINGER_SECONDS = 2.0  # after a refusal: how long the client's remaining bytes are read and dropped
MAX_READ_BYTES = 1024 * 1024  # above the largest read asyncio or uvloop hands a protocol (256 KiB)


def install(
    seconds: float, max_bytes: int, write_stall_seconds: float = 30.0, trusted_proxies: tuple[str, ...] = ()
) -> None:
    """Give every HTTP connection uvicorn's "auto" protocol serves from now on a head deadline of `seconds`, a
    head size bound of `max_bytes` (request line and headers, as sent), a write stall bound, and the hold after
    a 503 (except for connections from `trusted_proxies`)."""
    base = getattr(auto.AutoHTTPProtocol, "head_base", auto.AutoHTTPProtocol)
    auto.AutoHTTPProtocol = with_head_deadline(base, seconds, max_bytes, write_stall_seconds, trusted_proxies)


def with_head_deadline(
    base: type[asyncio.Protocol], seconds: float, max_bytes: int, write_stall_seconds: float = 30.0,
    trusted_proxies: tuple[str, ...] = (),
) -> type[asyncio.Protocol]:
    """`base` (uvicorn's h11 or httptools protocol) with the head deadline and size bound, the write stall bound
    and the hold after a 503."""
    proxies = ClientAddress(trusted_proxies)

    class HeadDeadline(base):  # type: ignore[valid-type, misc]
        head_base = base
        head_seconds = seconds
        head_max_bytes = max_bytes
        stall_seconds = write_stall_seconds

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if isinstance(getattr(self, "conn", None), h11.Connection):  # h11's own bound must not answer first
                self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes + MAX_READ_BYTES)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_cycle = None  # the request whose head came last
            self._head_bytes = False  # part of a head has come
            self._head_size = 0  # bytes received since the last head was complete, outside bodies
            self._refused = False  # answered 408 or 431: what comes now is dropped, unparsed
            self._stall_timer: asyncio.TimerHandle | None = None
            self._hold = 0.0  # seconds the next request waits to be read: the Retry-After of a 503 being sent
            self._hold_timer: asyncio.TimerHandle | None = None
            self._hold_began = 0.0
            self._waited = 0.0  # seconds the request about to be read waited in a hold
            self._noted_cycle = None  # the last request whose 503s are noted
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            self._holds = not (proxies.trusted and isinstance(peer, tuple) and proxies.trusts(peer[0]))
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            in_body = self.cycle is not None and self.cycle.more_body
            if not in_body:
                self._head_size += len(data)
            super().data_received(data)
            if self.cycle is not self._head_cycle:  # a new request's head is complete
                self._head_cycle, self._head_bytes, self._head_size = self.cycle, False, 0
                self._disarm()
                if self._waited:
                    self.cycle.scope[HELD_SCOPE_KEY], self._waited = self._waited, 0.0
                self._note_refusals()
            elif self._head_size > self.head_max_bytes:
                self._refuse(431, b"Request Header Fields Too Large", "request_too_large",
                             f"the request head is over the limit of {self.head_max_bytes} bytes")
            elif self.cycle is None or self.cycle.response_complete:  # part of a head
                self._head_bytes = True
                if self._head_timer is None:
                    self._arm()  # the next request's, after a response (keep-alive stopped counting)

        def _note_refusals(self) -> None:
            """Wraps a new request's send to note a 503's Retry-After. Called as soon as uvicorn has made its cycle
            (its ASGI task has not run yet): after reading, and after a response (h11 starts a pipelined one)."""
            cycle = self.cycle
            if cycle is None or cycle is self._noted_cycle or not self._holds:
                return
            self._noted_cycle, send = cycle, cycle.send

            async def send_noting(message) -> None:
                if message["type"] == "http.response.start" and message["status"] == 503:
                    self._hold = _retry_after(message.get("headers", ()))
                await send(message)

            cycle.send = send_noting

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._note_refusals()
            hold, self._hold = self._hold, 0.0
            if hold and not self.transport.is_closing() and self._idle():
                if self.timeout_keep_alive_task is not None:  # armed by uvicorn just now: it starts after the hold
                    self.timeout_keep_alive_task.cancel()
                    self.timeout_keep_alive_task = None
                if self._hold_timer is None:
                    self._hold_began = self.loop.time()
                else:
                    self._hold_timer.cancel()
                self.flow.pause_reading()
                self._hold_timer = self.loop.call_later(hold, self._release)

        def _idle(self) -> bool:
            """No request in progress or waiting (pipelined): the connection's next request is still unread."""
            return (self.cycle is None or self.cycle.response_complete) and not getattr(self, "pipeline", None)

        def _release(self) -> None:
            self._hold_timer = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            if _readable(self.transport):  # sent while held: its clock started when the hold did
                self._waited = self.loop.time() - self._hold_began
            self.flow.resume_reading()
            if self.timeout_keep_alive_task is None and self._idle():
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._hold_timer is not None:
                self._hold_timer.cancel()
                self._hold_timer = None
            self._writing_again()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall_timer is None:
                self._stall_timer = self.loop.call_later(self.stall_seconds, self._write_stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._writing_again()

        def _writing_again(self) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

        def _write_stalled(self) -> None:
            self._stall_timer = None
            if not self.transport.is_closing() and self.transport.get_protocol() is self:
                metrics.write_stalls.inc()
                self.transport.abort()

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
            self._refuse(408, b"Request Timeout", "header_timeout",
                         f"the request head did not arrive within {self.head_seconds:g}s")

        def _refuse(self, status: int, phrase: bytes, reason: str, message: str) -> None:
            """Answer `status` in our error body and close; a connection still answering an earlier request
            (pipelined) is just closed, and one upgraded to a WebSocket is not ours any more."""
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            self._disarm()
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()
                return
            metrics.count_rejection(reason)
            body = error_body(ErrorType.TIMEOUT if status == 408 else ErrorType.TOO_LARGE, message)
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\nx-request-id: %s\r\n\r\n%s"
                % (status, phrase, len(body), uuid.uuid4().hex.encode(), body)
            )
            self._refused = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_SECONDS, self.transport.close)
            else:
                self.transport.close()

    return HeadDeadline


def _retry_after(headers) -> float:
    """A response's Retry-After in seconds, at most MAX_HOLD_SECONDS; 0 without one (or an unreadable one)."""
    for name, value in headers:
        if name.lower() == b"retry-after":
            seconds = parse_retry_after(value.decode("latin-1")) or 0.0
            return min(seconds, MAX_HOLD_SECONDS) if math.isfinite(seconds) else 0.0
    return 0.0


def _readable(transport: asyncio.Transport) -> bool:
    """Bytes wait unread on the transport's socket (asyncio's and uvloop's alike)."""
    sock = transport.get_extra_info("socket")
    try:
        return bool(sock is not None and select.select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return False

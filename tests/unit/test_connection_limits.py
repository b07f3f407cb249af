"""The connection bounds on a real uvicorn server (loopback): a head that does not complete in time gets 408
in our body, a silent connection is closed, and whole requests (slow bodies, keep-alive pauses) are never cut;
a head over its size bound gets 431 in our body as soon as the bound is passed, before the rest is parsed; a
client that stops reading its answer is closed and its stream released, one that reads slowly never is."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest
import uvicorn

from bentoformers.observability.tracing import HELD_SCOPE_KEY
from bentoformers.serving.connection_limits import with_head_deadline

DEADLINE = 0.5
MAX_HEAD_BYTES = 8 * 1024


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module", params=["httptools", "h11"])  # uvicorn's two HTTP/1.1 protocols ("auto": httptools)
def address(request):
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    base = {"httptools": HttpToolsProtocol, "h11": H11Protocol}[request.param]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_app, http=with_head_deadline(base, DEADLINE, MAX_HEAD_BYTES), log_level="warning",
                            timeout_keep_alive=5, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(5)


def _read_all(conn: socket.socket) -> bytes:
    out = b""
    while chunk := conn.recv(4096):
        out += chunk
    return out


def _read_response(conn: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"ok"):
        out += conn.recv(4096)
    return out


def test_a_dribbled_head_gets_408_in_our_body(address):
    with socket.create_connection(address, timeout=10) as conn:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
            try:
                conn.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"x-request-id: " in answer and b"connection: close" in answer
    assert answer.endswith(b'{"error":{"type":"timeout_error","message":"the request head did not arrive within '
                           b'0.5s","param":null}}')


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(address):
    with socket.create_connection(address, timeout=10) as conn:
        assert _read_all(conn) == b""


def test_a_partial_head_after_a_response_gets_408(address):
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
        time.sleep(DEADLINE * 2)  # idle between requests: keep-alive's to bound, not the head deadline
        conn.sendall(b"GET / HT")
        assert _read_all(conn).startswith(b"HTTP/1.1 408 ")


def test_slow_bodies_and_keep_alive_pauses_are_not_cut(address):
    with socket.create_connection(address, timeout=10) as conn:
        for _ in range(3):
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
            for byte in b"body":  # the body takes longer than the head deadline: bounded elsewhere
                time.sleep(DEADLINE / 2)
                conn.sendall(bytes([byte]))
            assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
            time.sleep(DEADLINE * 1.5)


def test_install_replaces_the_auto_protocol_once_however_often_it_is_called(monkeypatch):
    import uvicorn.protocols.http.auto as auto

    from bentoformers.serving import connection_limits

    original = auto.AutoHTTPProtocol
    monkeypatch.setattr(auto, "AutoHTTPProtocol", original)
    connection_limits.install(7, 4096)
    connection_limits.install(3, 2048)
    assert auto.AutoHTTPProtocol.head_seconds == 3 and auto.AutoHTTPProtocol.head_max_bytes == 2048
    assert auto.AutoHTTPProtocol.__mro__[1] is getattr(original, "head_base", original)


def _send_until_answered(conn: socket.socket, head: bytes, total: int, piece: int = 4096) -> tuple[int, bytes]:
    """Sends `head`, then a header value of `total` bytes in `piece`-sized writes, stopping at the first answer;
    the bytes sent and what came back."""
    conn.sendall(head + b"X-Big: ")
    sent, answer = 0, b""
    conn.settimeout(0)
    while sent < total:
        try:
            answer += conn.recv(65536)
        except BlockingIOError:
            pass
        if answer:
            break
        try:
            sent += conn.send(b"v" * min(piece, total - sent))
        except BlockingIOError:
            time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            break
    conn.settimeout(10)
    return sent, answer + _read_all(conn)


def test_a_head_over_the_bound_gets_431_in_our_body_before_the_rest_is_sent(address):
    with socket.create_connection(address, timeout=10) as conn:
        started = time.monotonic()
        sent, answer = _send_until_answered(conn, b"GET / HTTP/1.1\r\nHost: x\r\n", 8_000_000)
        seconds = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert b"x-request-id: " in answer and b"connection: close" in answer
    assert answer.endswith(b'{"error":{"type":"request_too_large","message":"the request head is over the limit of '
                           + str(MAX_HEAD_BYTES).encode() + b' bytes","param":null}}')
    assert sent < 4_000_000 and seconds < 5  # answered while the client was still sending, not hung
    with socket.create_connection(address, timeout=10) as conn:  # under the bound: served, bodies not counted
        value = b"v" * (MAX_HEAD_BYTES - 200)
        body = b"b" * 1_000_000
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + value + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + value + b"\r\n\r\n")  # the count starts again
        assert _read_response(conn).startswith(b"HTTP/1.1 200 ")


STALL = 3.0


class _Streams:
    """A Starlette app streaming 64 KiB pieces for ever, noting each stream that ended (its generator closed)."""

    def __init__(self) -> None:
        from starlette.applications import Starlette
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        self.ended = threading.Event()
        self.sent = 0

        async def pieces():
            try:
                while True:
                    self.sent += 1
                    yield b"x" * 65536
                    await asyncio.sleep(0)  # as a real source does (a model's next tokens): others get the loop
            finally:
                self.ended.set()

        self.app = Starlette(routes=[Route("/stream", lambda request: StreamingResponse(pieces()))])


@pytest.fixture(params=["httptools", "h11"])
def streams(request):
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    base = {"httptools": HttpToolsProtocol, "h11": H11Protocol}[request.param]
    app = _Streams()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app.app, http=with_head_deadline(base, 10, MAX_HEAD_BYTES, STALL), log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield app, sock.getsockname()
    server.should_exit = True
    thread.join(5)


def _open_stream(address, window: int | None = 4096) -> socket.socket:
    conn = socket.socket()
    if window:  # a small window: the server's buffer fills soon
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    conn.connect(address)
    conn.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.recv(1024)  # the head and the first bytes; then this client stops reading
    return conn


def test_a_client_that_stops_reading_is_closed_and_its_stream_released(streams):
    app, address = streams
    with _open_stream(address) as conn:
        # Not read for a stall's worth: the server gives up on it, and the app's stream ends (what it held, freed).
        assert app.ended.wait(STALL + 10), "the stream still waits on a client that stopped reading"
        conn.settimeout(10)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while conn.recv(65536):  # what was in flight, then the reset of an aborted connection
                pass
            raise ConnectionResetError  # an orderly end is an end too


def test_a_client_that_reads_slowly_is_never_cut(streams):
    app, address = streams
    with _open_stream(address, window=None) as conn:
        conn.settimeout(5)
        received, stop = 0, time.monotonic() + 2 * STALL
        # Up to 64 KiB every 20 ms: far slower than the app writes, so the server's buffers stay full and its
        # writing pauses, but each pause ends as the reader frees a third of the kernel's send buffer.
        while time.monotonic() < stop:
            received += len(conn.recv(65536))
            time.sleep(0.02)
        assert not app.ended.is_set() and received > 65536


class _Refusing:
    """Answers /503 and /429 with their status and `Retry-After: 1`, anything else 200; notes when each request
    reached it."""

    def __init__(self) -> None:
        self.reached: list[tuple[str, float]] = []
        self.held: list[float | None] = []  # what each request's scope says it waited in a hold

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        self.reached.append((scope["path"], time.monotonic()))
        self.held.append(scope.get(HELD_SCOPE_KEY))
        status = {"/503": 503, "/429": 429}.get(scope["path"], 200)
        headers = [(b"content-length", b"2")] + ([(b"retry-after", b"1")] if status != 200 else [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def _refusing_server(protocol: str, trusted_proxies: tuple[str, ...] = ()):
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    base = {"httptools": HttpToolsProtocol, "h11": H11Protocol}[protocol]
    app = _Refusing()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # keep-alive shorter than the hold: the hold must not count as idling
    http = with_head_deadline(base, 10, MAX_HEAD_BYTES, trusted_proxies=trusted_proxies)
    config = uvicorn.Config(app, http=http, log_level="warning", timeout_keep_alive=0.5, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield app, sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(5)


@pytest.fixture(params=["httptools", "h11"])
def refusing(request):
    with _refusing_server(request.param) as served:
        yield served


def _get(conn: socket.socket, path: bytes) -> bytes:
    """One GET of `path` on the connection, and its answer."""
    conn.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    return _read_response(conn)


def test_after_a_503_the_connection_is_not_read_for_its_retry_after(refusing):
    """A client that sends again at once after a 503 waits on its own connection for the Retry-After it was
    told (its request reaches the app only then, and is served); a 429's connection is not held."""
    app, address = refusing
    with socket.create_connection(address, timeout=10) as conn:
        assert _get(conn, b"/503").startswith(b"HTTP/1.1 503 ")
        refused_at = time.monotonic()
        assert _get(conn, b"/").startswith(b"HTTP/1.1 200 ")  # again at once, on the same connection
        assert app.reached[-1][0] == "/" and app.reached[-1][1] - refused_at >= 0.9
        assert app.held[-1] == pytest.approx(1.0, abs=0.1)  # its clock (the queue's promise) starts at the hold
        assert _get(conn, b"/429").startswith(b"HTTP/1.1 429 ")
        limited_at = time.monotonic()
        assert _get(conn, b"/").startswith(b"HTTP/1.1 200 ")
        assert app.reached[-1][1] - limited_at < 0.5 and app.held[-1] is None
        assert _get(conn, b"/503").startswith(b"HTTP/1.1 503 ")
        time.sleep(1.05)  # as told (with a client's slack): sent after the hold, so it did not wait in it
        assert _get(conn, b"/").startswith(b"HTTP/1.1 200 ") and app.held[-1] is None
    with socket.create_connection(address, timeout=10) as other:  # other connections are read meanwhile
        assert _get(other, b"/503").startswith(b"HTTP/1.1 503 ")
        with socket.create_connection(address, timeout=10) as conn:
            started = time.monotonic()
            assert _get(conn, b"/").startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < 0.5


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_a_trusted_proxy_s_connection_is_not_held(protocol):
    """A proxy's pooled connection carries other clients' requests: a 503 to one must not stall the next."""
    with _refusing_server(protocol, trusted_proxies=("127.0.0.0/8",)) as (app, address):
        with socket.create_connection(address, timeout=10) as conn:
            assert _get(conn, b"/503").startswith(b"HTTP/1.1 503 ")
            refused_at = time.monotonic()
            assert _get(conn, b"/").startswith(b"HTTP/1.1 200 ")
            assert app.reached[-1][1] - refused_at < 0.5 and app.held[-1] is None

"""`python -m bentoformers.tools.traces`: an OTLP/HTTP trace receiver that prints each trace as a waterfall.

For a look at where requests spend their time without a tracing backend: point the service at it
(`OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318`), send requests, read the waterfalls. The tests receive
the service's export with the same `Receiver`.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

MAX_BODY_BYTES = 16 * 2**20
BAR_WIDTH = 40
SHOWN_ATTRIBUTES = ("http.response.status_code", "bentoformers.model", "bentoformers.items",
                    "bentoformers.input_tokens", "bentoformers.batch.items", "bentoformers.batch.padded_tokens",
                    "bentoformers.generated_tokens", "bentoformers.decode_steps")


class Receiver:
    """Receives OTLP/HTTP protobuf exports on `host:port` (0: any free port) and keeps every span as a dict:
    service, name, kind, trace, id, parent, attributes, events, links, start and end (ns)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                if self.path != "/v1/traces" or not 0 < length <= MAX_BODY_BYTES:
                    self.send_error(404 if self.path != "/v1/traces" else 413)
                    return
                request = ExportTraceServiceRequest.FromString(self.rfile.read(length))
                with receiver.lock:
                    receiver.spans.extend(spans_of(request))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)

    def forget(self, trace: str) -> None:
        with self.lock:
            self.spans = [s for s in self.spans if s["trace"] != trace]

    def wait_for(self, found: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every span received once `found(spans)` holds; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.received()
            if found(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"spans received: {sorted({s['name'] for s in spans})}")
            time.sleep(0.2)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def spans_of(request: ExportTraceServiceRequest) -> Iterator[dict[str, Any]]:
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield {
                    "service": resource.get("service.name"), "name": span.name, "kind": span.kind,
                    "trace": span.trace_id.hex(), "id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                    "attributes": {a.key: _value(a.value) for a in span.attributes},
                    "events": [(e.name, {a.key: _value(a.value) for a in e.attributes}, e.time_unix_nano)
                               for e in span.events],
                    "links": [link.span_id.hex() for link in span.links],
                    "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                }


def waterfall(spans: list[dict[str, Any]]) -> str:
    """One trace as text: each span under its parent, a bar for when it ran, its duration and a few attributes."""
    start = min(s["start"] for s in spans)
    length = max(max(s["end"] for s in spans) - start, 1)
    ids = {s["id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: s["start"]):
        children.setdefault(span["parent"] if span["parent"] in ids else "", []).append(span)
    name_width = max(len(s["name"]) for s in spans) + 2 * _depth(spans) + 2
    service_width = max(len(s["service"] or "") for s in spans)
    lines = [f"trace {spans[0]['trace']}  {length / 1e6:.2f} ms"]

    def walk(parent: str, depth: int) -> None:
        for span in children.get(parent, []):
            left = round((span["start"] - start) / length * BAR_WIDTH)
            width = max(1, round((span["end"] - span["start"]) / length * BAR_WIDTH))
            bar = (" " * left + "█" * width).ljust(BAR_WIDTH)[:BAR_WIDTH]
            shown = " ".join(f"{k.rsplit('.', 1)[-1]}={span['attributes'][k]}" for k in SHOWN_ATTRIBUTES
                             if k in span["attributes"])
            events = " ".join(f"{name}@{(at - span['start']) / 1e6:.2f}ms" for name, _, at in span["events"])
            lines.append(
                f"  {(span['service'] or ''):<{service_width}}  {('  ' * depth + span['name']):<{name_width}}"
                f"|{bar}| {(span['end'] - span['start']) / 1e6:8.2f} ms  {shown} {events}".rstrip()
            )
            walk(span["id"], depth + 1)

    walk("", 0)
    return "\n".join(lines)


def _depth(spans: list[dict[str, Any]]) -> int:
    parents = {s["id"]: s["parent"] for s in spans}
    deepest = 0
    for span_id in parents:
        depth, seen = 0, set()
        while parents.get(span_id) in parents and span_id not in seen:
            seen.add(span_id)
            span_id, depth = parents[span_id], depth + 1
        deepest = max(deepest, depth)
    return deepest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bentoformers.tools.traces", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318, help="OTLP/HTTP's port (default: 4318)")
    parser.add_argument("--quiet-seconds", type=float, default=2.0,
                        help="a trace is printed once no span of it has come for this long (default: 2)")
    args = parser.parse_args(argv)
    with Receiver(args.host, args.port) as receiver:
        print(f"receiving OTLP/HTTP traces on {receiver.url}/v1/traces", flush=True)
        seen: dict[str, tuple[int, float]] = {}  # trace -> (spans received, when that count was first seen)
        while True:
            time.sleep(0.5)
            by_trace: dict[str, list[dict[str, Any]]] = {}
            for span in receiver.received():
                by_trace.setdefault(span["trace"], []).append(span)
            now = time.monotonic()
            for trace, spans in by_trace.items():
                count, since = seen.get(trace, (0, now))
                if len(spans) != count:
                    seen[trace] = (len(spans), now)
                elif now - since >= args.quiet_seconds:
                    print(waterfall(spans) + "\n", flush=True)
                    receiver.forget(trace)
                    del seen[trace]


if __name__ == "__main__":
    main()

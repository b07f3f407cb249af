"""`bentoformers bench --rerank`: closed-loop load on POST /rerank, in pairs/s, against the model in process.

Each request is one query with N documents (default 32): N query/document pairs for the model. At each
concurrency, after a warm-up, C clients each send a request, wait for the answer and send the next, for a
fixed time. Per point: pairs/s, requests/s, p50/p95/p99 latency, errors by status. The ceiling, from the same
run, is each built variant of the served reranker scoring the same pairs in this process, N pairs per call,
as its model service runs them (every core, length-sorted sub-batches; no HTTP, no queue). The body is TEI's,
so `--path` can point it at a TEI server too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from typing import Any

from bentoformers import __version__
from bentoformers.exits import FAILED, OK, CliError
from bentoformers.tools.load import (
    DISTINCT_BODIES,
    LocalServer,
    closed_loop,
    event_loop_runner,
    format_errors,
    format_ms,
    load_texts,
    percentile,
    served_models,
    time_calls,
)

DEFAULT_DOCUMENTS = 32
QUERY_WORDS = 5  # a query is the opening words of one of its documents (as the build's ranking check)


def run(args: argparse.Namespace) -> int:
    levels = args.concurrency or [1, 8]
    sizes = args.texts_per_request or [DEFAULT_DOCUMENTS]
    requests = {size: query_sets(load_texts(args.texts), size) for size in sizes}
    server = LocalServer.start() if args.url is None else None
    base = (server.url if server else args.url).rstrip("/")
    route = args.path or "/rerank"
    try:
        served = served_models(base, args.api_key)
        points = event_loop_runner()(_sweep(args, base + route, requests, levels))
    except OSError as exc:
        raise CliError(f"could not reach {base}: {exc}") from None
    finally:
        if server:
            server.stop()
    rerankers = [m for m in served if m.get("task") == "rerank" and (args.model is None or m.get("id") == args.model)]
    name = args.model or (rerankers[0]["id"] if rerankers else None)
    report = {
        "target": {"url": base, "route": route, "model": name, "local": server is not None, "served_models": served},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "timeout_s": args.timeout,
                     "texts": str(args.texts) if args.texts else "shipped sentences"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "bentoformers": __version__,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "points": points,
        "in_process": in_process(name, requests, args.duration) if name else {},
        "served_precision": rerankers[0].get("precision") if rerankers else None,
    }
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    dead = [p for p in points if p["ok"] == 0]
    for p in dead:
        print(f"error: no successful answer at concurrency {p['concurrency']}, {p['documents']} documents/request: "
              f"{format_errors(p['errors'])}", file=sys.stderr)
    return FAILED if dead else OK


def query_sets(texts: list[str], size: int) -> list[tuple[str, list[str]]]:
    """DISTINCT_BODIES (query, documents) sets: consecutive texts, the query the opening words of one of them."""
    sets = []
    for k in range(DISTINCT_BODIES):
        documents = [texts[(k * size + j) % len(texts)] for j in range(size)]
        sets.append((" ".join(documents[k % size].split()[:QUERY_WORDS]), documents))
    return sets


async def _sweep(args: argparse.Namespace, url: str, requests: dict[int, list[tuple[str, list[str]]]],
                 levels: list[int]) -> list[dict[str, Any]]:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    points = []
    print(HEADER, file=sys.stderr)
    for size, sets in requests.items():
        bodies = [json.dumps({"query": q, "texts": d, "truncate": True} | ({"model": args.model} if args.model else {}))
                  .encode() for q, d in sets]
        connector = aiohttp.TCPConnector(limit=max(levels))
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
            if args.warmup > 0:
                await closed_loop(session, url, bodies, max(levels), args.warmup)
            for concurrency in levels:
                point = await closed_loop(session, url, bodies, concurrency, args.duration)
                point.update(documents=size, concurrency=concurrency, pairs_per_s=point["ok"] * size / point["elapsed_s"])
                points.append(point)
                print(_row(point), file=sys.stderr)
    return points


def in_process(name: str, requests: dict[int, list[tuple[str, list[str]]]], seconds: float) -> dict[str, Any]:
    """Each built variant of the reranker `name` in this process's model store, scoring the benchmark's
    pairs (truncated, as sent) one request's pairs per call: pairs/s and the p50 time of a call."""
    import bentoml
    from bentoml.exceptions import NotFound

    from bentoformers.runtime.card import ModelCard
    from bentoformers.runtime.selfcheck import as_served
    from bentoformers.runtime.tokenizer import TextTokenizer
    from bentoformers.spec import store_name

    out: dict[str, Any] = {}
    for precision in ("int8", "fp32"):
        try:
            folder = bentoml.models.get(f"{store_name(name, precision)}:latest").path
        except NotFound:
            continue
        tokenizer = TextTokenizer(folder, ModelCard.load(folder).max_length)
        encoder = as_served(precision, folder)
        if encoder is None:
            continue
        for size, sets in requests.items():
            calls_ids = [tokenizer.encode_pairs([(q, d) for d in documents], truncate=True) for q, documents in sets]
            encoder.classify(calls_ids[0])
            calls, elapsed = time_calls(encoder.classify, lambda n, calls_ids=calls_ids: calls_ids[n % len(calls_ids)], seconds)
            out[f"{precision}, {size} pairs/call"] = {
                "precision": precision, "run_threads": encoder.run_threads,
                "lone": encoder.lone_way() if size == 1 else "", "pairs_per_call": size, "pairs_per_s": len(calls) * size / elapsed,
                "p50_ms": percentile(sorted(calls), 0.5),
            }
    return out


HEADER = f"{'docs/req':>8} {'conc':>5} {'pairs/s':>9} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  errors"


def _row(p: dict[str, Any]) -> str:
    return (f"{p['documents']:>8} {p['concurrency']:>5} {p['pairs_per_s']:>9.1f} {p['requests_per_s']:>8.1f} "
            f"{format_ms(p['p50_ms']):>8} {format_ms(p['p95_ms']):>8} {format_ms(p['p99_ms']):>8}  {format_errors(p['errors'])}")


def print_report(report: dict[str, Any]) -> None:
    target = report["target"]
    served = f"{target['model']} ({report['served_precision']})" if target["model"] else "no reranker listed"
    print(f"\n{target['url']}{target['route']}: {served}, {report['settings']['duration_s']:g} s per point, "
          "closed loop, 1 query x N documents per request")
    print(HEADER)
    for p in report["points"]:
        print(_row(p))
    ceilings = report["in_process"]
    for label, figures in ceilings.items():
        print(f"in process, {label}: {figures['pairs_per_s']:.1f} pairs/s, p50 {figures['p50_ms']:.2f} ms/call")
    for p in report["points"]:
        same = ceilings.get(f"{report['served_precision']}, {p['documents']} pairs/call")
        if same:
            print(f"  {p['documents']} x {p['concurrency']}: {p['pairs_per_s'] / same['pairs_per_s']:.2f} of the "
                  f"{report['served_precision']} ceiling")

"""`bentoformers bench --generation`: streamed completions at several concurrencies, against decoding alone.

Each client sends a prompt to POST /v1/completions with `stream: true`, reads the server-sent events, and sends
the next prompt when its stream ends. Per point: completion tokens/s over the whole point (from the streams'
`usage`), time to first token (TTFT) p50/p99, and inter-token latency (the gap between two text events)
p50/p99. The baseline, from the same run, is the same model decoding one sequence at a time in this process
(prefill, then one step per token): what a lone stream gets without HTTP, queueing or neighbours.

Without a URL it builds a small GPT-2 of its own (random weights, a tokenizer trained on the shipped sentences)
into the store and serves it, so the figures need no download and mean the same on every machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bentoformers import __version__
from bentoformers.exits import FAILED, OK, CliError
from bentoformers.tools.load import (
    LocalServer,
    event_loop_runner,
    format_ms,
    load_texts,
    percentile,
    served_models,
)

BENCH_MODEL = "bench-gpt2"
# 4 layers of width 256: big enough that a decoding step is real work, small enough to build in seconds.
BENCH_SHAPE = {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512}


def run(args: argparse.Namespace) -> int:
    prompts = [" ".join(t.split()[:8]) for t in load_texts(args.texts)]
    levels = args.concurrency or [1, 4, 16]
    folder, server = None, None
    if args.url is None:
        folder, model_list = build_bench_model()
        env = {**os.environ, "BENTOFORMERS_MODEL_LIST": str(model_list), "BENTOFORMERS_MODELS": BENCH_MODEL}
        server = LocalServer.start(env=env)
    base = (server.url if server else args.url).rstrip("/")
    model = args.model or (BENCH_MODEL if server else None)
    try:
        points = event_loop_runner()(_sweep(args, base, model, prompts, levels))
        served = served_models(base, args.api_key)
    except OSError as exc:
        raise CliError(f"could not reach {base}: {exc}") from None
    finally:
        if server:
            server.stop()
    report = {
        "target": {"url": base, "route": "/v1/completions", "model": model, "local": server is not None,
                   "served_models": served},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "max_tokens": args.max_tokens},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "bentoformers": __version__,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "points": points,
    }
    if folder is not None:
        report["alone_in_process"] = decode_alone(folder, prompts, args.max_tokens, args.duration)
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return OK if all(p["streams"] for p in points) else FAILED


def build_bench_model() -> tuple[Path, Path]:
    """The benchmark's GPT-2, built (fp32) into the store unless it is there; its folder and a model list."""
    import bentoml
    import yaml

    from bentoformers.build.builder import build_model
    from bentoformers.spec import load_model_list, store_name
    from bentoformers.tools.tiny_models import make_tiny_gpt2

    work = Path(tempfile.gettempdir()) / "bentoformers-bench-model"
    source = make_tiny_gpt2(work / "checkpoint", **BENCH_SHAPE)
    model_list = work / "models.yaml"
    entry = {"name": BENCH_MODEL, "source": str(source), "task": "generation", "variants": [{"precision": "fp32"}]}
    model_list.write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))
    (spec,) = load_model_list(model_list)
    (result,) = build_model(spec, report=lambda line: print(line, file=sys.stderr))
    if not result.ok:
        raise CliError(f"the benchmark model did not build: {result.reason}")
    return Path(bentoml.models.get(f"{store_name(BENCH_MODEL, 'fp32')}:latest").path), model_list


async def _sweep(args: argparse.Namespace, base: str, model: str | None, prompts: list[str], levels: list[int]):
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    points = []
    print(HEADER, file=sys.stderr)
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        if args.warmup > 0:
            await closed_loop(session, base, model, prompts, max(levels), args.warmup, args.max_tokens)
        for concurrency in levels:
            point = await closed_loop(session, base, model, prompts, concurrency, args.duration, args.max_tokens)
            points.append(point)
            print(_row(point), file=sys.stderr)
    return points


async def closed_loop(session, base: str, model: str | None, prompts: list[str], concurrency: int, seconds: float,
                      max_tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens, streams, failures = 0, 0, 0
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal tokens, streams, failures
        i = k
        while time.perf_counter() < stop:
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if model:
                body["model"] = model
            i += concurrency
            try:
                first, between, used = await _stream(session, f"{base}/v1/completions", body)
            except Exception:  # noqa: BLE001 - any failure is counted, and the client goes on
                failures += 1
                await asyncio.sleep(0.05)
                continue
            streams += 1
            tokens += used
            if first is not None:
                ttfts.append(first)
            gaps.extend(between)

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    ttfts.sort()
    gaps.sort()
    return {
        "concurrency": concurrency, "streams": streams, "failures": failures, "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p99_ms": percentile(ttfts, 0.99),
        "itl_p50_ms": percentile(gaps, 0.5), "itl_p99_ms": percentile(gaps, 0.99),
    }


async def _stream(session, url: str, body: dict[str, Any]) -> tuple[float | None, list[float], int]:
    """(seconds to the first text, the gaps between text events, completion tokens) of one streamed completion."""
    sent = time.perf_counter()
    first, last, gaps, used = None, None, [], 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                now = time.perf_counter()
                if first is None:
                    first = now - sent
                else:
                    gaps.append(now - last)
                last = now
    return first, gaps, used


def decode_alone(folder: Path, prompts: list[str], max_tokens: int, seconds: float) -> dict[str, Any]:
    """Greedy decoding of one sequence at a time, in this process: prefill, then one step per token."""
    import numpy as np

    from bentoformers.runtime.card import ModelCard
    from bentoformers.runtime.decoder import OnnxDecoder
    from bentoformers.runtime.tokenizer import TextTokenizer

    card = ModelCard.load(folder)
    decoder = OnnxDecoder(folder)
    ids = TextTokenizer(folder, card.max_length).encode(prompts, truncate=True)
    ttfts, gaps, tokens = [], [], 0
    start = time.perf_counter()
    for n in range(len(ids) * 100):
        if time.perf_counter() - start >= seconds:
            break
        began = time.perf_counter()
        logits, batch = decoder.prefill(ids[n % len(ids)])
        token = int(np.argmax(logits))
        ttfts.append(time.perf_counter() - began)
        tokens += 1
        for _ in range(max_tokens - 1):
            if token in card.eos_token_ids:
                break
            stepped = time.perf_counter()
            logits, batch = decoder.step(batch, np.array([token]))
            token = int(np.argmax(logits[0]))
            gaps.append(time.perf_counter() - stepped)
            tokens += 1
    elapsed = time.perf_counter() - start
    ttfts.sort()
    gaps.sort()
    return {"streams": len(ttfts), "tokens_per_s": tokens / elapsed, "ttft_p50_ms": percentile(ttfts, 0.5),
            "ttft_p99_ms": percentile(ttfts, 0.99), "itl_p50_ms": percentile(gaps, 0.5),
            "itl_p99_ms": percentile(gaps, 0.99)}


HEADER = f"{'conc':>5} {'tokens/s':>9} {'streams':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  failed"


def _row(p: dict[str, Any], label: str | None = None) -> str:
    return (f"{label or p['concurrency']:>5} {p['tokens_per_s']:>9.1f} {p['streams']:>8} {format_ms(p['ttft_p50_ms']):>9} "
            f"{format_ms(p['ttft_p99_ms']):>9} {format_ms(p['itl_p50_ms']):>8} {format_ms(p['itl_p99_ms']):>8}  {p.get('failures', '-')}")


def print_report(report: dict[str, Any]) -> None:
    target = report["target"]
    print(f"\n{target['url']}{target['route']} (model {target['model']}, {report['settings']['max_tokens']} tokens "
          f"per completion, greedy, {report['settings']['duration_s']:g} s per point; times in ms)")
    print(HEADER)
    for p in report["points"]:
        print(_row(p))
    alone = report.get("alone_in_process")
    if alone:
        print(_row(alone, "alone"), " <- one sequence at a time, in process")
    points = {p["concurrency"]: p for p in report["points"]}
    low, high = min(points), max(points)
    if points[low]["tokens_per_s"] and high != low:
        print(f"concurrency {high}: {points[high]['tokens_per_s'] / points[low]['tokens_per_s']:.2f}× the tokens/s of "
              f"concurrency {low}; TTFT p99 = {(points[high]['ttft_p99_ms'] or 0) / (points[high]['ttft_p50_ms'] or 1):.2f}"
              f"× its p50")

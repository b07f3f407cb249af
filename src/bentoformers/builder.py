"""The build step: checkpoint -> ONNX -> optimise/quantize -> validate against fp32 PyTorch -> model store.

Each variant is saved only if it passes its fidelity gates; its store version is derived from everything
that shapes it, so running the build again finds it and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


from . import __version__
from .decoder import OnnxDecoder
from .engine import ONNX_FILE, ModelCard, OnnxEncoder, TextTokenizer, l2_normalize, label_scores, pick_device
from .export import (
    copy_tokenizer,
    export_onnx,
    optimize,
    quantize_int8,
    quantize_weights_int8,
    reference_embeddings,
    reference_greedy,
    reference_logits,
    resolve_source,
    sentence_transformers_config,
)
from .fidelity import compare, compare_greedy, compare_scores, generation_prompts, shipped_sentences
from .spec import ModelSpec, VariantSpec, gate_failures, store_name

GREEDY_TOKENS = 16  # new tokens per validation prompt

Report = Callable[[str], None]


@dataclass
class VariantResult:
    tag: str
    precision: str
    status: str  # "saved", "up to date", "failed gate", "skipped"
    figures: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("saved", "up to date")


@contextmanager
def step(report: Report, what: str) -> Iterator[None]:
    report(f"  {what} ...")
    start = time.perf_counter()
    yield
    report(f"  {what}: done in {time.perf_counter() - start:.1f}s")


def build_model(spec: ModelSpec, *, force: bool = False, report: Report = print) -> list[VariantResult]:
    folder, revision = resolve_source(spec.source, spec.revision)
    card = _card(spec, folder)
    detail = f"{card.pooling} pooling" if card.task == "embeddings" else card.task
    report(f"{spec.name}: {spec.source} (revision {revision}), {detail}, max {card.max_length} tokens")
    todo: list[tuple[VariantSpec, str]] = []
    results: list[VariantResult] = []
    for variant in spec.variants:
        tag = f"{store_name(spec.name, variant.precision)}:{_version(spec, variant, revision)}"
        if not force and _exists(tag):
            results.append(VariantResult(tag, variant.precision, "up to date"))
            report(f"  {tag}: up to date")
        else:
            todo.append((variant, tag))
    if not todo:
        return results

    sentences = shipped_sentences()
    with tempfile.TemporaryDirectory(prefix="bentoformers-build-") as tmp:
        work = Path(tmp)
        with step(report, "export to ONNX (optimum)"):
            exported = export_onnx(folder, work / "export", spec.task)
        if spec.task == "generation":
            sentences = generation_prompts()
            prompts = TextTokenizer(exported.parent, card.max_length).encode(sentences, truncate=True)
            with step(report, f"fp32 PyTorch greedy reference on {len(prompts)} prompts"):
                reference: object = (prompts, reference_greedy(folder, prompts, GREEDY_TOKENS))
        elif spec.task == "classification":
            with step(report, f"fp32 PyTorch reference on {len(sentences)} sentences"):
                reference = label_scores(reference_logits(folder, sentences, card.max_length), card.multi_label)
        else:
            with step(report, f"fp32 PyTorch reference on {len(sentences)} sentences"):
                reference = reference_embeddings(folder, sentences, card)
        for variant, tag in todo:
            result = _build_variant(spec, variant, tag, card, exported, reference, sentences, work, revision, report)
            results.append(result)
    return results


def _build_variant(
    spec: ModelSpec,
    variant: VariantSpec,
    tag: str,
    card: ModelCard,
    exported: Path,
    reference: object,
    sentences: list[str],
    work: Path,
    revision: str,
    report: Report,
) -> VariantResult:
    import bentoml

    precision = variant.precision
    device = "cuda" if precision == "fp16" else "cpu"
    if device == "cuda" and pick_device() != "cuda":
        reason = "fp16 is validated on a GPU and none is present here"
        report(f"  {tag}: skipped ({reason})")
        return VariantResult(tag, precision, "skipped", reason=reason)

    out = work / precision
    out.mkdir()
    with step(report, f"{precision}: build graph"):
        if precision == "int8" and spec.task == "generation":
            graph = quantize_weights_int8(exported, work / "int8-weights.onnx")
        elif precision == "int8":
            graph = quantize_int8(exported, work / "int8-tmp")
        else:
            graph = optimize(
                exported, work / f"{precision}-opt.onnx", for_gpu=device == "cuda", fp16=precision == "fp16",
                fuse=spec.task != "generation",
            )
        shutil.copy2(graph, out / ONNX_FILE)
    copy_tokenizer(exported.parent, out)
    variant_card = ModelCard(**{**card.__dict__, "precision": precision})
    variant_card.save(out)

    with step(report, f"{precision}: validate against fp32 PyTorch"):
        figures = _validate(variant_card, out, device, reference, sentences)
    gates = spec.gates(variant)
    failed = gate_failures(figures, gates)
    shown = ", ".join(f"{k} {v:.5f}" for k, v in figures.items())
    if failed:
        reason = "below its gate: " + "; ".join(failed)
        report(f"  {tag}: NOT saved, {reason}")
        return VariantResult(tag, precision, "failed gate", figures, reason)

    size = (out / ONNX_FILE).stat().st_size
    (out / "README.md").write_text(_model_card_text(spec, variant_card, revision, figures, gates, size, len(sentences)))
    if _exists(tag):  # --force: the rebuilt variant replaces the stored one
        bentoml.models.delete(tag)
    with bentoml.models.create(
        tag,
        labels={
            "model": spec.name,
            "task": spec.task,
            "precision": precision,
            "source": spec.source,
            "revision": revision,
        },
        metadata={
            "validation": figures,
            "gates": gates,
            "validation_texts": len(sentences),
            "opset": _opset(out / ONNX_FILE),
            "onnx_bytes": size,
            **{k: v for k, v in variant_card.__dict__.items() if k not in ("name", "precision")},
            "bentoformers": __version__,
        },
    ) as stored:
        shutil.copytree(out, stored.path, dirs_exist_ok=True)
    report(f"  {tag}: saved ({shown}; {size / 2**20:.1f} MiB)")
    return VariantResult(tag, precision, "saved", figures)


def _validate(card: ModelCard, folder: Path, device: str, reference: object, sentences: list[str]) -> dict[str, float]:
    """The built graph, run by the serving code, against the fp32 PyTorch reference."""
    if card.task == "generation":
        prompts, expected = reference  # type: ignore[misc]
        decoder = OnnxDecoder(folder, device=device)
        return compare_greedy([decoder.greedy(p, GREEDY_TOKENS, card.eos_token_ids) for p in prompts], expected)
    encoder = OnnxEncoder(folder, device=device)
    try:
        candidate = encoder.embed(TextTokenizer(folder, card.max_length).encode(sentences, truncate=True))
    finally:
        encoder.close()
    if card.task == "classification":
        return compare_scores(label_scores(candidate, card.multi_label), reference)  # type: ignore[arg-type]
    if card.normalize:
        candidate = l2_normalize(candidate)
    return compare(candidate, reference)  # type: ignore[arg-type]


def _card(spec: ModelSpec, folder: Path) -> ModelCard:
    config = json.loads((folder / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("n_positions") or 1 << 30
    if spec.task == "classification":
        id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
        labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
        return ModelCard(
            name=spec.name, task=spec.task, precision="fp32", max_length=int(min(spec.max_length or context, context)),
            dimensions=len(labels), labels=labels,
            multi_label=config.get("problem_type") == "multi_label_classification",
        )
    if spec.task == "generation":
        eos = config.get("eos_token_id")
        generation_config = folder / "generation_config.json"
        if eos is None and generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ModelCard(
            name=spec.name, task=spec.task, precision="fp32", max_length=int(min(spec.max_length or context, context)),
            eos_token_ids=eos_ids,
        )
    found = sentence_transformers_config(folder)
    pooling = spec.pooling if spec.pooling != "auto" else str(found.get("pooling", "mean"))
    normalize = spec.normalize if spec.normalize is not None else bool(found.get("normalize", False))
    max_length = spec.max_length or found.get("max_length") or config.get("max_position_embeddings", 512)
    return ModelCard(
        name=spec.name,
        task=spec.task,
        precision="fp32",
        pooling=pooling,  # type: ignore[arg-type]
        normalize=normalize,
        max_length=int(min(int(max_length), config.get("max_position_embeddings", 1 << 30))),  # type: ignore[arg-type]
        dimensions=int(config["hidden_size"]),
    )


def _version(spec: ModelSpec, variant: VariantSpec, revision: str) -> str:
    """Everything that shapes the artefact; the same inputs give the same store version."""
    key = json.dumps(
        [spec.model_dump(exclude={"variants"}), variant.model_dump(), spec.gates(variant), revision, __version__],
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _exists(tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(tag)
        return True
    except NotFound:
        return False


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _model_card_text(
    spec: ModelSpec, card: ModelCard, revision: str, figures: dict[str, float], gates: dict[str, float], size: int, n: int
) -> str:
    rows = "\n".join(f"| {k} | {figures[k]:.5f} | {gates[k]} |" for k in figures)
    return f"""# {spec.name} ({card.precision})

Built by bentoformers {__version__} from `{spec.source}` (revision `{revision}`).

- task: {card.task}; {_task_line(card)}
- max input: {card.max_length} tokens; ONNX graph: {size / 2**20:.1f} MiB

## Fidelity against the fp32 PyTorch reference ({n} shipped {"prompts" if card.task == "generation" else "sentences"})

| figure | value | gate (figures named max_* are upper bounds) |
| --- | --- | --- |
{rows}
"""


def _task_line(card: ModelCard) -> str:
    if card.task == "classification":
        kind = "multi-label (sigmoid)" if card.multi_label else "single-label (softmax)"
        return f"{kind}; labels: {', '.join(card.labels)}"
    if card.task == "generation":
        return f"causal LM with KV cache; greedy-validated on {GREEDY_TOKENS} new tokens per prompt"
    return f"{card.pooling} pooling; normalised: {card.normalize}; {card.dimensions} dimensions"

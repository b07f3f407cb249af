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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bentoformers import __version__
from bentoformers.build.export import (
    CPU_GRAPH,
    copy_tokenizer,
    export_onnx,
    optimize,
    reference_embeddings,
    reference_greedy,
    reference_logits,
    reference_sparse,
    reference_token_logits,
    resolve_source,
    sentence_transformers_config,
)
from bentoformers.build.quantize import int8_scheme, quantize_decoder_int8, quantize_encoder_int8
from bentoformers.runtime import cpu, selfcheck
from bentoformers.runtime.card import ONNX_FILE, ModelCard
from bentoformers.runtime.chat import resolve_template
from bentoformers.runtime.encoder import POOLED_OUTPUT, label_scores, sigmoid, softmax
from bentoformers.runtime.fidelity import (
    compare_sparse,
    gate_failures,
    generation_prompts,
    nli_pairs,
    quantized_retrieval,
    rerank_sets,
    shipped_sentences,
)
from bentoformers.runtime.outputs import CALIBRATED, QUANTIZED, calibrate, ranges_of, served
from bentoformers.runtime.session import pick_device
from bentoformers.runtime.tokenizer import TextTokenizer
from bentoformers.spec import ModelSpec, VariantSpec, store_name
from bentoformers.tasks import TASKS

GREEDY_TOKENS = 16  # new tokens per validation prompt
EMULATION_TIMEOUT = 1800  # seconds for one variant's check set under qemu (~50x slower than native)

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
        tag = f"{store_name(spec.name, variant.precision)}:{_version(spec, variant, revision, card.chat_template)}"
        if not force and _exists(tag):
            results.append(VariantResult(tag, variant.precision, "up to date"))
            report(f"  {tag}: up to date")
        else:
            todo.append((variant, tag))
    if not todo:
        return results

    with tempfile.TemporaryDirectory(prefix="bentoformers-build-") as tmp:
        work = Path(tmp)
        with step(report, "export to ONNX (optimum)"):
            exported = export_onnx(folder, work / "export", spec.task, card.pooling)
        # The validation inputs as token ids: they calibrate int8, validate every variant, and seed the check set.
        tokenizer = TextTokenizer(exported.parent, card.max_length)
        validation = _validation_set(card, folder, tokenizer, report)
        held_out = None
        if card.task == "embeddings":
            card, held_out = _calibrate_outputs(card, folder, tokenizer, validation, report)
        for variant, tag in todo:
            result = _build_variant(spec, variant, tag, card, exported, validation, work, revision, report, held_out)
            results.append(result)
    return results


@dataclass
class ValidationSet:
    ids: list[list[int]]  # the inputs as token ids (a pair's second text offset, runtime/tokenizer.py)
    reference: object  # the fp32 PyTorch reference per input: rows, rows per token, or greedy tokens
    groups: list[int] | None = None  # rerank: the sizes of the consecutive query/document sets


def _validation_set(card: ModelCard, folder: Path, tokenizer: TextTokenizer, report: Report) -> ValidationSet:
    """The task's fixed inputs with their fp32 PyTorch reference."""
    if TASKS[card.task].decoder:
        ids = tokenizer.encode(generation_prompts(), truncate=True)
        with step(report, f"fp32 PyTorch greedy reference on {len(ids)} prompts"):
            return ValidationSet(ids, reference_greedy(folder, ids, GREEDY_TOKENS))
    if card.task == "rerank":
        sets = rerank_sets()
        pairs = [(query, doc) for query, docs in sets for doc in docs]
        with step(report, f"fp32 PyTorch reference on {len(sets)} queries x {len(sets[0][1])} documents"):
            scores = sigmoid(reference_logits(folder, pairs, card.max_length)[:, 0])
        return ValidationSet(tokenizer.encode_pairs(pairs, truncate=True), scores, [len(docs) for _, docs in sets])
    if card.task == "classification" and card.entailment_index >= 0:
        pairs = nli_pairs()
        with step(report, f"fp32 PyTorch reference on {len(pairs)} premise/hypothesis pairs (NLI)"):
            scores = label_scores(reference_logits(folder, pairs, card.max_length), card.multi_label)
        return ValidationSet(tokenizer.encode_pairs(pairs, truncate=True), scores)
    sentences = shipped_sentences()
    ids = tokenizer.encode(sentences, truncate=True)
    with step(report, f"fp32 PyTorch reference on {len(sentences)} sentences"):
        if card.task == "classification":
            return ValidationSet(ids, label_scores(reference_logits(folder, sentences, card.max_length), card.multi_label))
        if card.task == "token-classification":
            return ValidationSet(ids, [softmax(t) for t in reference_token_logits(folder, sentences, card.max_length)])
        if card.task == "sparse-embeddings":
            return ValidationSet(ids, reference_sparse(folder, sentences, card.max_length))
        return ValidationSet(ids, reference_embeddings(folder, sentences, card))


@dataclass
class HeldOut:
    """Texts the output ranges were not calibrated on, to measure each quantized output type against float:
    the odd shipped sentences as documents, their first five words as queries, with the fp32 PyTorch reference."""

    queries: list[list[int]]
    documents: list[list[int]]
    ref_queries: np.ndarray
    ref_documents: np.ndarray


def _calibrate_outputs(
    card: ModelCard, folder: Path, tokenizer: TextTokenizer, validation: ValidationSet, report: Report
) -> tuple[ModelCard, HeldOut]:
    """The int8/uint8 ranges, once per model from the fp32 PyTorch reference on the even shipped sentences (so
    every variant, and a service that falls back to another, quantizes alike); the odd ones are held out."""
    reference = np.asarray(validation.reference)
    sizes = sorted({card.dimensions, *card.matryoshka_dimensions}, reverse=True)
    ranges = calibrate(reference[0::2], card.normalize, sizes)
    queries = [" ".join(s.split()[:5]) for s in shipped_sentences()[1::2]]
    with step(report, f"fp32 PyTorch reference on {len(queries)} held-out queries (quantized outputs)"):
        ref_queries = reference_embeddings(folder, queries, card)
    held_out = HeldOut(tokenizer.encode(queries, truncate=True), validation.ids[1::2],
                       served(ref_queries, card.normalize, card.dimensions),
                       served(reference[1::2], card.normalize, card.dimensions))
    return replace(card, output_ranges=ranges), held_out


def output_figures(card: ModelCard, engine, held_out: HeldOut, gates: dict[str, float]) -> dict[str, dict]:
    """Per quantized output type, its retrieval figure on the held-out texts at the full size: against the float
    vectors of the same variant (what a client of this service compares it with; the variant's floats have their
    own gates against fp32), with the figure against the fp32 PyTorch reference's floats for information; its
    gate, and whether it is offered."""
    queries = served(engine.embed(held_out.queries), card.normalize, card.dimensions)
    documents = served(engine.embed(held_out.documents), card.normalize, card.dimensions)
    ranges = ranges_of(card.output_ranges, card.dimensions)
    figures = {}
    for kind in QUANTIZED:
        kind_ranges = ranges if kind in CALIBRATED else None
        found = quantized_retrieval(queries, documents, queries, documents, kind, kind_ranges)
        measure = "recall_at_10" if kind in CALIBRATED else "rescored_recall_at_10"
        value = round(found.pop(measure), 4)
        against_fp32 = quantized_retrieval(queries, documents, held_out.ref_queries, held_out.ref_documents, kind,
                                           kind_ranges)[measure]
        figures[kind] = {"offered": value >= gates[kind], "measure": measure, "value": value, "gate": gates[kind],
                         **{k: round(v, 4) for k, v in found.items()},
                         "against_fp32_reference": round(against_fp32, 4)}
    return figures


def _build_variant(
    spec: ModelSpec,
    variant: VariantSpec,
    tag: str,
    card: ModelCard,
    exported: Path,
    validation: ValidationSet,
    work: Path,
    revision: str,
    report: Report,
    held_out: HeldOut | None = None,
) -> VariantResult:
    precision = variant.precision
    device = "cuda" if precision == "fp16" else "cpu"
    if device == "cuda" and pick_device() != "cuda":
        reason = "fp16 is validated on a GPU and none is present here"
        report(f"  {tag}: skipped ({reason})")
        return VariantResult(tag, precision, "skipped", reason=reason)

    out = work / precision
    out.mkdir()
    with step(report, f"{precision}: build graph"):
        shutil.copy2(_graph(spec, precision, exported, validation.ids, work), out / ONNX_FILE)
    copy_tokenizer(exported.parent, out)
    variant_card = ModelCard(**{**card.__dict__, "precision": precision})
    variant_card.save(out)

    with step(report, f"{precision}: validate against fp32 PyTorch ({cpu.isa_class()}, native)"):
        figures = _validate(variant_card, out, device, validation)
    gates = spec.gates(variant)
    failed = {cpu.isa_class(): gate_failures(figures, gates)}
    if not failed[cpu.isa_class()]:  # only then is it worth proving on the other classes
        check_inputs = _write_check_set(out, variant_card, validation, gates)
        isa = _prove_per_isa(out, tag, precision, figures, len(validation.ids), check_inputs, report)
        failed = {name: proof.get("failures") for name, proof in isa["proofs"].items()}
    failed = {name: f for name, f in failed.items() if f}
    if failed:
        reason = "below its gate on " + ", ".join(f"{name}: {'; '.join(f)}" for name, f in failed.items())
        report(f"  {tag}: NOT saved, {reason}")
        return VariantResult(tag, precision, "failed gate", figures, reason)
    shown = ", ".join(f"{k} {v:.5f}" for k, v in figures.items())
    if held_out is not None:
        engine = selfcheck.open_engine(out, device=device)
        variant_card = replace(variant_card, output_types=output_figures(variant_card, engine, held_out,
                                                                         spec.output_gates_of()))
        variant_card.save(out)
        shown += "; " + ", ".join(f"{k} {f['value']}" + ("" if f["offered"] else " (not offered)")
                                  for k, f in variant_card.output_types.items())

    timings = _time_variant(out, device)
    size = (out / ONNX_FILE).stat().st_size
    (out / "README.md").write_text(_model_card_text(spec, variant_card, revision, gates, size, isa, timings))
    metadata = {
        "validation": figures,
        "gates": gates,
        "validation_texts": len(validation.ids),
        "isa": isa,
        "timings": timings,
        **({"quantization": int8_scheme(spec.task)} if precision == "int8" else {}),
        "opset": _opset(out / ONNX_FILE),
        "onnx_bytes": size,
        **{k: v for k, v in variant_card.__dict__.items() if k not in ("name", "precision", "output_ranges")},
        "bentoformers": __version__,
    }
    _save(tag, out, {"model": spec.name, "task": spec.task, "precision": precision, "source": spec.source,
                     "revision": revision}, metadata)
    report(f"  {tag}: saved ({shown}; {size / 2**20:.1f} MiB)")
    return VariantResult(tag, precision, "saved", figures)


def _graph(spec: ModelSpec, precision: str, exported: Path, ids: list[list[int]], work: Path) -> Path:
    """The variant's graph: int8 quantized for its task (encoders calibrated on `ids`), else optimised (fp16 converted)."""
    if precision == "int8" and TASKS[spec.task].decoder:
        return quantize_decoder_int8(exported, work / "int8.onnx")
    if precision == "int8":
        optimized = optimize(exported, work / "int8-base.onnx", for_gpu=False, for_int8=True)
        return quantize_encoder_int8(optimized, work / "int8.onnx", ids)
    return optimize(
        exported, work / f"{precision}-opt.onnx", for_gpu=precision == "fp16", fp16=precision == "fp16",
        fuse=not TASKS[spec.task].decoder,
    )


def _save(tag: str, folder: Path, labels: dict[str, str], metadata: dict) -> None:
    import bentoml

    if _exists(tag):  # --force: the rebuilt variant replaces the stored one
        bentoml.models.delete(tag)
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as stored:
        shutil.copytree(folder, stored.path, dirs_exist_ok=True)


def _validate(card: ModelCard, folder: Path, device: str, validation: ValidationSet) -> dict[str, float]:
    """The built graph, run by the serving code, against the fp32 PyTorch reference: the start-up check's
    measure on every validation input, with the neighbour overlap."""
    engine = selfcheck.open_engine(folder, device=device)
    if card.task == "sparse-embeddings":  # on the whole dense rows (the check set keeps each text's top terms)
        return compare_sparse(engine.embed(validation.ids), np.asarray(validation.reference))
    check = selfcheck.check_set(card, validation.ids, validation.reference, {}, GREEDY_TOKENS, validation.groups)
    return selfcheck.measure(check, engine, neighbours=10)


def _write_check_set(folder: Path, card: ModelCard, validation: ValidationSet, gates: dict) -> int:
    """A few of the validation inputs with their fp32 PyTorch reference (for rerank, a few whole query sets):
    what a serving CPU re-proves. Returns how many inputs it holds."""
    ids, reference, groups = validation.ids, validation.reference, validation.groups
    if groups is None:
        picked = selfcheck.sample(len(ids))
    else:
        starts = np.cumsum([0, *groups])
        chosen = selfcheck.sample(len(groups), size=max(1, selfcheck.CHECK_INPUTS // max(groups)))
        picked = [i for g in chosen for i in range(starts[g], starts[g + 1])]
        groups = [groups[g] for g in chosen]
    check = selfcheck.check_set(
        card, [ids[i] for i in picked], [reference[i] for i in picked], gates, GREEDY_TOKENS, groups  # type: ignore[index]
    )
    selfcheck.write(folder, check)
    return len(picked)


def _prove_per_isa(
    folder: Path, tag: str, precision: str, native: dict, inputs: int, check_inputs: int, report: Report
) -> dict:
    """The native figures, and the check set under emulation of each older instruction-set class (int8 only:
    fp32 and fp16 kernels differ between classes by float rounding alone)."""
    proofs = {cpu.isa_class(): {"how": "native", "inputs": inputs, "figures": native}}
    isa: dict = {"built_on": cpu.describe(), "proofs": proofs, "not_proven": {}}
    newer = [c for c in cpu.ORDER if cpu.ORDER.index(c) > cpu.ORDER.index(cpu.isa_class())]
    for name in newer:
        isa["not_proven"][name] = "no emulator for a newer class than this CPU's; re-proven where it serves"
    if precision != "int8":
        return isa
    for name in cpu.emulated_classes():
        model = cpu.EMULATED[name]
        if cpu.emulator() is None:
            isa["not_proven"][name] = "qemu-x86_64 is not installed (Debian: apt-get install qemu-user)"
            report(f"  {tag}: not proven on {name}: qemu-x86_64 is not installed; the service re-proves it where it serves")
            continue
        with step(report, f"{precision}: check set under qemu-x86_64 -cpu {model} ({name})"):
            done = cpu.run_emulated(name, ["-m", "bentoformers.runtime.selfcheck", str(folder)], EMULATION_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"the check under qemu -cpu {model} failed:\n{done.stderr[-2000:]}")
        found = json.loads(done.stdout.strip().splitlines()[-1])
        isa["proofs"][name] = {"how": f"qemu-x86_64 -cpu {model}", "inputs": check_inputs, **found}
    return isa


def _time_variant(folder: Path, device: str) -> dict:
    """The variant's speed on its check set on this CPU, as a serving one measures it at start-up (after one
    warm-up run): {cpu class: selfcheck.time_variants' figures, with the CPU's model name}."""
    check = selfcheck.load(folder)
    engine = selfcheck.open_engine(folder, device=device)
    selfcheck.measure(check, engine)
    (timing,) = selfcheck.time_variants({"variant": (check, engine)}).values()
    return {cpu.isa_class(): {"cpu": cpu.describe()["model"], **timing}}


def _card(spec: ModelSpec, folder: Path) -> ModelCard:
    config = json.loads((folder / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("n_positions") or 1 << 30
    if TASKS[spec.task].labelled:
        id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
        labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
        if spec.task == "rerank" and len(labels) != 1:
            raise ValueError(
                f"{spec.name}: a reranker is a cross-encoder with one output (a relevance logit); {spec.source} has "
                f"{len(labels)} labels ({', '.join(labels)}): serve it with task: classification"
            )
        # An NLI model (zero-shot classification): the first label named entail..., as Transformers' pipeline finds it.
        entailment = [i for i, label in enumerate(labels) if label.lower().startswith("entail")]
        return ModelCard(
            name=spec.name, task=spec.task, precision="fp32", max_length=int(min(spec.max_length or context, context)),
            dimensions=len(labels), labels=labels,
            multi_label=config.get("problem_type") == "multi_label_classification",
            entailment_index=entailment[0] if entailment and spec.task == "classification" else -1,
        )
    if TASKS[spec.task].decoder:
        eos = config.get("eos_token_id")
        generation_config = folder / "generation_config.json"
        if eos is None and generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ModelCard(
            name=spec.name, task=spec.task, precision="fp32", max_length=int(min(spec.max_length or context, context)),
            eos_token_ids=eos_ids, chat_template=resolve_template(folder, spec.source, spec.chat_template),
        )
    if spec.task == "sparse-embeddings":
        return ModelCard(
            name=spec.name, task=spec.task, precision="fp32", max_length=int(min(spec.max_length or context, context)),
            dimensions=int(config["vocab_size"]),
        )
    found = sentence_transformers_config(folder)
    pooling = spec.pooling if spec.pooling != "auto" else str(found.get("pooling", "mean"))
    normalize = spec.normalize if spec.normalize is not None else bool(found.get("normalize", False))
    max_length = spec.max_length or found.get("max_length") or config.get("max_position_embeddings", 512)
    hidden = int(config["hidden_size"])
    too_large = [size for size in spec.matryoshka_dimensions or [] if size > hidden]
    if too_large:
        raise ValueError(f"{spec.name}: matryoshka_dimensions {too_large} exceed the model's hidden size, {hidden}")
    prompts: dict[str, str] = found.get("prompts", {}) if spec.prompts is None else spec.prompts  # type: ignore[assignment]
    default_prompt = str(found.get("default_prompt_name", ""))
    if default_prompt not in prompts:
        if spec.prompts is None and default_prompt:  # as sentence-transformers refuses it
            raise ValueError(f"{spec.name}: the checkpoint's default_prompt_name {default_prompt!r} is not one of "
                             f"its prompts ({', '.join(prompts) or 'none'})")
        default_prompt = ""
    sizes = tuple(sorted({*spec.matryoshka_dimensions, hidden}, reverse=True)) if spec.matryoshka_dimensions else ()
    return ModelCard(
        name=spec.name,
        task=spec.task,
        precision="fp32",
        pooling=pooling,  # type: ignore[arg-type]
        normalize=normalize,
        max_length=int(min(int(max_length), config.get("max_position_embeddings", 1 << 30))),  # type: ignore[arg-type]
        dimensions=hidden,
        matryoshka_dimensions=sizes,
        prompts=dict(prompts),
        default_prompt_name=default_prompt,
    )


def _version(spec: ModelSpec, variant: VariantSpec, revision: str, chat_template: str = "") -> str:
    """Everything that shapes the artefact; the same inputs give the same store version."""
    key = json.dumps(
        [
            spec.model_dump(exclude={"variants", "chat_template"}), variant.model_dump(), spec.gates(variant), revision,
            __version__, int8_scheme(spec.task) if variant.precision == "int8" else None,
            *([POOLED_OUTPUT] if TASKS[spec.task].output == "pooled" else []),  # built since the pooling is in the graph
            # built since SkipLayerNormalization is left out of encoders' CPU graphs
            *([CPU_GRAPH] if variant.precision != "fp16" and not TASKS[spec.task].decoder else []),
            *([chat_template] if chat_template else []),  # the template's text: a .jinja file can change
        ],
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
    spec: ModelSpec, card: ModelCard, revision: str, gates: dict[str, float], size: int, isa: dict, timings: dict
) -> str:
    names = list(gates)
    rows = []
    for name, proof in isa["proofs"].items():
        values = " | ".join(f"{proof['figures'][k]:.5f}" if k in proof["figures"] else "—" for k in names)
        rows.append(f"| {name} | {proof['how']} | {proof['inputs']} | {values} |")
    rows += [f"| {name} | not proven: {why} | | {' | '.join('' for _ in names)} |" for name, why in isa["not_proven"].items()]
    built_on = isa["built_on"]
    return f"""# {spec.name} ({card.precision})

Built by bentoformers {__version__} from `{spec.source}` (revision `{revision}`).

- task: {card.task}; {_task_line(card)}
- max input: {card.max_length} tokens; ONNX graph: {size / 2**20:.1f} MiB
{_pooling_line(card)}{f"- int8 scheme: {int8_scheme(card.task)}" if card.precision == "int8" else ""}

## Fidelity against the fp32 PyTorch reference, per CPU instruction-set class

Built on {built_on["model"]} ({built_on["class"]}; flags {", ".join(built_on["flags"])}). Every model service
re-runs the stored check set ({selfcheck.CHECK_FILE}) on its own CPU before it serves this variant.

| class | how | inputs | {" | ".join(names)} |
| --- | --- | --- | {" | ".join("---" for _ in names)} |
| gate | | | {" | ".join(str(gates[k]) for k in names)} |
{chr(10).join(rows)}

Figures named max_* are upper bounds; the rest are lower bounds.

## Speed on the check set, per CPU

{_timing_table(timings)}
{_outputs_table(card)}"""


def _outputs_table(card: ModelCard) -> str:
    if not card.output_types:
        return ""
    rows = "\n".join(f"| {kind} | {f['measure']} | {f['value']} | {f['gate']} | {'yes' if f['offered'] else 'no'} | "
                     + ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("offered", "measure", "value", "gate"))
                     + " |" for kind, f in card.output_types.items())
    return f"""
## Quantized outputs (embedding_types)

int8/uint8 use per-dimension ranges calibrated on the fp32 PyTorch reference of the even shipped sentences
(sentence-transformers' quantize_embeddings with those ranges); each type is measured on the held-out odd
sentences (their first five words as queries) against the variant's float top 10: int8/uint8 as
dequantized vectors, binary/ubinary as the Hamming top 40 rescored with float vectors. float and base64 are
always offered.

| type | measure | value | gate | offered | for information |
| --- | --- | --- | --- | --- | --- |
{rows}
"""


def _timing_table(timings: dict) -> str:
    """The build's timings (_time_variant) as the card shows them."""
    runs = [k for k in next(iter(timings.values())) if k.endswith("seconds") or k == "tokens_per_second"]
    rows = [f"| {name} | {t['cpu']} | " + " | ".join(str(t[k]) for k in runs) + " |" for name, t in timings.items()]
    return f"""Timed alone at build time (best of a few runs); a serving CPU times every variant that holds there,
interleaved, and with `precision: auto` serves the fastest (its log line and `/v1/models` say which and why).

| class | CPU | {" | ".join(runs)} |
| --- | --- | {" | ".join("---" for _ in runs)} |
{chr(10).join(rows)}"""


def _pooling_line(card: ModelCard) -> str:
    if card.task != "embeddings":
        return ""
    return (f"- pooling: in the graph ({card.pooling}, in fp32, output `{POOLED_OUTPUT}`: only the vectors leave the "
            f"session); L2 normalisation after the model, unless a request asks for the raw vector\n")


def _task_line(card: ModelCard) -> str:
    line = TASKS[card.task].summary(card)
    return f"{line}; greedy-validated on {GREEDY_TOKENS} new tokens per prompt" if TASKS[card.task].decoder else line

"""The stored check set of a built variant, and the proof that it still holds on the CPU that runs it.

The build writes a few of the shipped inputs (token ids) with their fp32 PyTorch reference and the
variant's gates beside the graph. The build runs it under emulation for older instruction sets, and
every model service runs it on its own CPU before it serves: int8 kernels compute differently per
instruction set, so a gate passed on the build machine says nothing about the serving one.

    python -m bentoformers.runtime.selfcheck FOLDER   # prints {"figures": ..., "failures": [...]} as JSON
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bentoformers.runtime.fidelity import (
    compare,
    compare_greedy,
    compare_ranking,
    compare_scores,
    compare_sparse,
    gate_failures,
)
from bentoformers.tasks import TASKS

CHECK_FILE = "selfcheck.json"
CHECK_INPUTS = 24  # evenly spaced over the shipped inputs: an unbiased sample, ~0.1 s for int8 MiniLM
# Figures a small sample cannot estimate (neighbour overlap needs the whole set); the build gates them.
NOT_CHECKED = frozenset({"neighbour_overlap", "dot_recall_at_10"})
SPARSE_TERMS = 256  # SPLADE: the reference's largest weights kept per input (a dense row is the whole vocabulary)

logger = logging.getLogger("bentoformers")


def sample(count: int, size: int = CHECK_INPUTS) -> list[int]:
    """Evenly spaced indices of `size` of `count` inputs."""
    return sorted({round(i * (count - 1) / max(size - 1, 1)) for i in range(min(size, count))})


def check_set(
    card: Any, inputs: list[list[int]], reference: Any, gates: dict[str, float], new_tokens: int,
    groups: list[int] | None = None,
) -> dict:
    """Token ids, the fp32 PyTorch reference for them (rows, a row per token, or greedy tokens), the gates, and
    how to compare. Rerank: `groups` are the sizes of the consecutive query/document sets."""
    ragged = TASKS[card.task].ragged
    if TASKS[card.task].output == "sparse":
        reference = [_top_terms(np.asarray(row)) for row in reference]
        ragged = True
    return {
        "task": card.task,
        "inputs": inputs,
        "reference": [np.asarray(r).tolist() for r in reference] if ragged else np.asarray(reference).tolist(),
        "groups": groups,
        "gates": {k: v for k, v in gates.items() if k not in NOT_CHECKED},
        "normalize": card.normalize,
        "multi_label": card.multi_label,
        "new_tokens": new_tokens,
        "eos_token_ids": list(card.eos_token_ids),
    }


def _top_terms(row: np.ndarray) -> dict[str, list]:
    top = np.argsort(-row, kind="stable")[:SPARSE_TERMS]
    return {"indices": top.tolist(), "values": row[top].tolist()}


def write(folder: Path, check: dict) -> None:
    (folder / CHECK_FILE).write_text(json.dumps(check))


def load(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / CHECK_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def measure(check: dict[str, Any], engine: Any, neighbours: int = 0) -> dict[str, float]:
    """The check set through a loaded engine (an OnnxEncoder or OnnxDecoder), against its reference.

    `neighbours`: for embeddings, also the top-k neighbour overlap (meaningful on the whole validation set).
    """
    from bentoformers.runtime.encoder import l2_normalize, label_scores, sigmoid, softmax

    task, inputs = check["task"], check["inputs"]
    if task == "generation":
        tokens = [engine.greedy(p, check["new_tokens"], tuple(check.get("eos_token_ids", ()))) for p in inputs]
        return compare_greedy(tokens, check["reference"])
    rows = engine.embed(inputs)
    if task == "token-classification":
        real = [row[: len(seq)] for row, seq in zip(rows, inputs)]
        return compare_scores(softmax(np.concatenate(real)), np.concatenate([np.asarray(r) for r in check["reference"]]))
    if task == "sparse-embeddings":
        known = np.full(rows.shape, np.nan, dtype=np.float32)
        for row, terms in zip(known, check["reference"]):
            row[terms["indices"]] = terms["values"]
        return compare_sparse(rows, known, neighbours=0)
    reference = np.asarray(check["reference"])
    if task == "rerank":
        return compare_ranking(sigmoid(rows[:, 0]), reference, check["groups"])
    if task == "classification":
        return compare_scores(label_scores(rows, check.get("multi_label", False)), reference)
    if check.get("normalize"):
        rows = l2_normalize(rows)
    figures = compare(rows, reference, k=neighbours)
    return figures if neighbours else {k: v for k, v in figures.items() if k not in NOT_CHECKED}


def open_engine(folder: str | Path, device: str = "cpu", threads: int | None = None) -> Any:
    from bentoformers.runtime.card import ModelCard
    from bentoformers.runtime.decoder import OnnxDecoder
    from bentoformers.runtime.encoder import OnnxEncoder

    card = ModelCard.load(folder)
    if TASKS[card.task].decoder:
        return OnnxDecoder(folder, device=device, threads=threads)
    return OnnxEncoder(folder, device=device, threads=threads)


@dataclass
class Proof:
    """What the start-up check found for the variant that serves, and for any that was passed over."""

    precision: str
    engine: Any
    figures: dict[str, float] | None  # None: the variant has no stored check set (built before there was one)
    refused: list[dict[str, Any]] = field(default_factory=list)  # [{"precision", "reason", "figures"}]


def first_that_holds(
    candidates: list[tuple[str, str | Path]],
    forced: bool,
    open_: Callable[[str | Path], Any] = open_engine,
    on_refusal: Callable[[str, str], None] = lambda precision, reason: None,
) -> Proof:
    """Loads the candidates in order (precision, folder) and serves the first whose check set meets its gates here.

    With a forced precision (one candidate) a failed check refuses to start.
    """
    from bentoformers.runtime import cpu

    refused: list[dict[str, Any]] = []
    for precision, folder in candidates:
        engine = open_(folder)
        check = load(folder)
        if check is None:
            logger.warning("%s has no stored check set (built by an older bentoformers); not re-proven here", folder)
            return Proof(precision, engine, None, refused)
        figures = measure(check, engine)
        failed = gate_failures(figures, check["gates"])
        if not failed:
            return Proof(precision, engine, figures, refused)
        reason = f"below its gate on this CPU ({cpu.isa_class()}): " + "; ".join(failed)
        on_refusal(precision, reason)
        refused.append({"precision": precision, "reason": reason, "figures": figures})
        if forced:
            raise RuntimeError(f"precision {precision} was asked for, but it is {reason}; refusing to start")
        logger.warning("not serving %s: %s", precision, reason)
    raise RuntimeError("no built variant holds on this CPU: " + "; ".join(f"{r['precision']} {r['reason']}" for r in refused))


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    check = load(folder)
    if check is None:
        print(json.dumps({"error": f"no {CHECK_FILE} in {folder}"}))
        return 2
    figures = measure(check, open_engine(folder, threads=1))
    print(json.dumps({"figures": figures, "failures": gate_failures(figures, check["gates"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

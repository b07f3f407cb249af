"""The stored check set of a built variant, and the proof that it still holds on the CPU that runs it.

The build writes a few of the shipped inputs (token ids) with their fp32 PyTorch reference and the
variant's gates beside the graph. The build runs it under emulation for older instruction sets, and
every model service runs it on its own CPU before it serves: int8 kernels compute differently per
instruction set, so a gate passed on the build machine says nothing about the serving one.

Nor does a speed measured there: int8 measured 2.07x fp32 on a CPU with AMX and 0.74-1.36x on a Zen 4
without. So with `precision: auto` every variant that holds is also timed on its check set, and the
fastest serves.

    python -m bentoformers.runtime.selfcheck FOLDER   # prints {"figures": ..., "failures": [...]} as JSON
"""

from __future__ import annotations

import json
import logging
import sys
import time
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
TIMING_SECONDS = 1.0  # about how long timing the variants that hold may take, all together
LONE_GAIN = 0.05  # the least share of the lone texts' time a second threading must save to be kept (a session more)
TIMING_ROUNDS = 7  # at most; at least MIN_TIMING_ROUNDS after the proof's own run (which warms each variant up)
MIN_TIMING_ROUNDS = 3  # best of one was noise on a shared CPU: the choice flipped between runs
CONFIRM_ROUNDS = 5  # a lone-text split is timed again, routed against not, this many rounds each, before it is kept

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


def _timed_runs(
    check: dict[str, Any], engine: Any, per_text: list[list[float]] | None = None
) -> dict[str, Callable[[], int]]:
    """What timing a variant runs, by name: each returns the tokens it ran (generation: the tokens it generated).

    Encoders: the check set in one batched call, and text by text (int8 can win the one and lose the other);
    `per_text` gets each text's time alone, round after round.
    """
    inputs = check["inputs"]
    if check["task"] == "generation":
        eos = tuple(check.get("eos_token_ids", ()))
        return {"greedy": lambda: sum(len(engine.greedy(p, check["new_tokens"], eos)) for p in inputs)}

    def batched() -> int:
        engine.embed(inputs)
        return sum(map(len, inputs))

    def one_by_one() -> int:
        for i, ids in enumerate(inputs):
            t = time.perf_counter()
            engine.embed([ids])
            if per_text is not None:
                per_text[i].append(time.perf_counter() - t)
        return sum(map(len, inputs))

    return {"batched": batched, "one_by_one": one_by_one}


def time_variants(
    checks: dict[str, tuple[dict[str, Any], Any]], budget: float = TIMING_SECONDS,
    per_text: dict[Any, list[list[float]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each variant ({precision: (check set, engine)}) timed on its check set, the variants interleaved round by
    round in alternating order (a neighbour's load then slows them all alike), best of the rounds:
    {precision: {"<run>_seconds": ..., "seconds": their sum, "tokens_per_second": the first run's rate (the
    batched call for encoders), "rounds"}}. With `per_text`, it gets each encoder variant's times of each check-set
    text alone, one per round, by variant."""
    if per_text is not None:
        per_text |= {key: [[] for _ in check["inputs"]] for key, (check, _) in checks.items()}
    runs = {
        precision: _timed_runs(check, engine, per_text[precision] if per_text is not None else None)
        for precision, (check, engine) in checks.items()
    }
    best: dict[str, dict[str, float]] = {p: {} for p in runs}
    tokens: dict[str, dict[str, int]] = {p: {} for p in runs}
    started = time.perf_counter()
    rounds = 0
    while rounds < MIN_TIMING_ROUNDS or (rounds < TIMING_ROUNDS and time.perf_counter() - started < budget):
        order = list(runs.items())
        for precision, named in order if rounds % 2 == 0 else order[::-1]:  # neither always runs first
            for name, run in named.items():
                t = time.perf_counter()
                tokens[precision][name] = run()
                seconds = time.perf_counter() - t
                best[precision][name] = min(seconds, best[precision].get(name, seconds))
        rounds += 1
    timings = {}
    for precision, seconds in best.items():
        first = next(iter(seconds))
        timings[precision] = {
            **{f"{name}_seconds": round(s, 6) for name, s in seconds.items()},
            "seconds": round(sum(seconds.values()), 6),
            "tokens_per_second": round(tokens[precision][first] / max(seconds[first], 1e-9), 1),
            "rounds": rounds,
        }
    return timings


@dataclass
class Proof:
    """What the start-up check found for the variant that serves, and for any that was passed over."""

    precision: str
    engine: Any
    figures: dict[str, float] | None  # None: the variant has no stored check set (built before there was one)
    refused: list[dict[str, Any]] = field(default_factory=list)  # [{"precision", "reason", "figures"}]
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)  # {precision: time_variants' figures}
    # (with `threadings`, each variant's figures are those of its faster threading, with "run_threads" and
    # "seconds_by_run_threads"; "lone_run_threads" where a call of one text runs faster in the other threading;
    # an encoder timed both ways counts its texts alone by their median times over the rounds, not their best)
    why: str = ""  # why this variant serves, with the timings that decided it

    @property
    def tokens_per_second(self) -> float | None:
        """The served variant's rate on its check set's batched call (generation: greedy tokens), here."""
        return self.timings.get(self.precision, {}).get("tokens_per_second")


def fastest_that_holds(
    candidates: list[tuple[str, str | Path]],
    forced: bool,
    open_: Callable[[str | Path], Any] = open_engine,
    on_refusal: Callable[[str, str], None] = lambda precision, reason: None,
    timing_budget: float = TIMING_SECONDS,
    threadings: bool = False,
) -> Proof:
    """Loads the candidates (precision, folder; best first), re-proves each on its check set here, times those
    that hold (time_variants) and serves the fastest.

    `threadings`: an engine that offers other ways of using the cores (OnnxEncoder.threadings) is timed each way
    too, and serves the faster: on a Zen 4 one ONNX Runtime thread per sub-batch, side by side, ran int8 MiniLM
    1.1-1.3x faster than every core on each sub-batch, and fp32 1.2-1.6x slower. An encoder keeps both ways where
    a lone text of some lengths runs faster in the way slower batched (a second thread pays more as a text grows):
    calls of several texts go the one way, those lone texts the other.

    With a forced precision (one candidate) a failed check refuses to start. A variant built before there were
    check sets is served as found, untimed, if no candidate before it holds.
    """
    from bentoformers.runtime import cpu

    refused: list[dict[str, Any]] = []
    holding: dict[str, tuple[dict[str, Any], Any]] = {}
    figures_of: dict[str, dict[str, float]] = {}
    for precision, folder in candidates:
        engine = open_(folder)
        check = load(folder)
        if check is None:
            if holding:
                break
            logger.warning("%s has no stored check set (built by an older bentoformers); not re-proven here", folder)
            return Proof(precision, engine, None, refused, why="no check set: not re-proven or timed")
        figures = measure(check, engine)
        failed = gate_failures(figures, check["gates"])
        if not failed:
            holding[precision] = (check, engine)
            figures_of[precision] = figures
            continue
        reason = f"below its gate on this CPU ({cpu.isa_class()}): " + "; ".join(failed)
        on_refusal(precision, reason)
        refused.append({"precision": precision, "reason": reason, "figures": figures})
        if forced:
            raise RuntimeError(f"precision {precision} was asked for, but it is {reason}; refusing to start")
        logger.warning("not serving %s: %s", precision, reason)
    if not holding:
        raise RuntimeError(
            "no built variant holds on this CPU: " + "; ".join(f"{r['precision']} {r['reason']}" for r in refused)
        )
    if threadings:
        timings, engines = _time_threadings(holding, timing_budget)
    else:
        timings, engines = time_variants(holding, timing_budget), {p: engine for p, (_, engine) in holding.items()}
    chosen = min(timings, key=lambda p: timings[p]["seconds"])
    shown = ", ".join(f"{p} {t['seconds'] * 1000:.1f} ms" for p, t in timings.items())
    if forced:
        why = f"asked for; its check set runs in {shown}"
    elif len(timings) == 1:
        why = f"the only variant that holds here; its check set runs in {shown}"
    else:
        why = f"the fastest that holds on this CPU ({cpu.isa_class()}): check set in {shown}"
    if "run_threads" in timings[chosen]:
        ways = ", ".join(f"{t}: {sec * 1000:.1f} ms" for t, sec in timings[chosen]["seconds_by_run_threads"].items())
        lone = engines[chosen].lone_way() if hasattr(engines[chosen], "lone_way") else ""
        why += (f"; {timings[chosen]['run_threads']} ONNX Runtime thread(s) per sub-batch"
                f"{f', {lone}' if lone else ''} (by threads: {ways})")
    return Proof(chosen, engines[chosen], figures_of[chosen], refused, timings, why)


def as_served(precision: str, folder: str | Path) -> Any | None:
    """The variant as a model service on this machine would run it (re-proven here, in its faster way of using
    the cores), for the benchmarks; None where it fails its check on this CPU."""
    try:
        return fastest_that_holds([(precision, folder)], forced=True, threadings=True).engine
    except RuntimeError as exc:
        logger.warning("%s", exc)
        return None


def _time_threadings(
    holding: dict[str, tuple[dict[str, Any], Any]], budget: float
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """time_variants over every threading of every variant; per variant, the faster threading's figures and engine."""
    ways = {
        (precision, threads): (check, way)
        for precision, (check, engine) in holding.items()
        for threads, way in (engine.threadings() if hasattr(engine, "threadings") else {0: engine}).items()
    }
    per_text: dict[Any, list[list[float]]] = {}
    timed = time_variants(ways, budget, per_text)
    timings: dict[str, dict[str, Any]] = {}
    engines: dict[str, Any] = {}
    for precision in holding:
        mine = {threads: timed[(p, threads)] for p, threads in timed if p == precision}
        fastest = min(mine, key=lambda threads: mine[threads]["seconds"])
        timings[precision] = dict(mine[fastest])
        engines[precision] = ways[(precision, fastest)][1]
        if len(mine) == 1:
            continue
        timings[precision] |= {
            "run_threads": fastest, "seconds_by_run_threads": {str(t): f["seconds"] for t, f in mine.items()},
        }
        way = {threads: ways[(precision, threads)][1] for threads in mine}
        if len(way) != 2 or not all(hasattr(e, "lone") for e in way.values()):
            continue  # ways that cannot share the work: the faster in all
        # calls of several texts in the way faster batched (best of the rounds: one call of the whole check set
        # varies little); a call of one text in the way faster at its length
        batched = min(mine, key=lambda threads: mine[threads]["batched_seconds"])
        other = next(threads for threads in way if threads != batched)
        engine = engines[precision] = way[batched]
        typical = {threads: [float(np.median(times)) for times in per_text[(precision, threads)]] for threads in way}
        span, one_by_one = _lone_span(holding[precision][0]["inputs"], engine, way[other], typical[batched], typical[other])
        if span is not None:
            engine.lone, engine.lone_tokens = way[other], span
        # each way's figure as the served one is made: its best batched call and its texts' median times alone
        by_threads = {str(t): round(mine[t]["batched_seconds"] + sum(typical[t]), 6) for t in way}
        timings[precision] = dict(mine[batched]) | {
            "one_by_one_seconds": round(one_by_one, 6), "seconds": round(mine[batched]["batched_seconds"] + one_by_one, 6),
            "run_threads": batched, "seconds_by_run_threads": by_threads,
            **({"lone_run_threads": other, "lone_tokens": list(span)} if span is not None else {}),
        }
    return timings, engines


def _lone_span(
    inputs: list[list[int]], main: Any, other: Any, main_seconds: list[float], other_seconds: list[float]
) -> tuple[tuple[int, int | None] | None, float]:
    """Which lone texts `other` runs, from each check-set text's median time alone in both ways (time_variants; the
    best of the rounds favoured the way whose time varies more: a sleeping second thread that now and then woke
    fast sent a candidate int8 MiniLM graph's lone texts to two threads on a Zen 5, which then ran one text per
    call at 16-22 % fewer texts/s): the one length that splits them best, shorter texts to the way with fewer
    threads and longer ones to the way with more (a second thread pays more as a text grows: in one run on a Zen
    5, int8 MiniLM ran lone texts under 32 tokens faster on one core and longer ones on two; in others one core
    was faster at every length, its sleeping second thread slow to wake). The split is taken only if it saves
    LONE_GAIN of the time without it, only if both ways give every text the same row, and only if timing the
    check set text by text once more, so routed against not, confirms the gain (_split_confirmed: one of 16
    start-ups of int8 MiniLM on a Zen 5, with the medians alone, still served one text per call 20 % slower,
    most likely so split). Returns the span of lengths [from, below) for `other` (None: no text) and the seconds
    of the check set text by text, so routed."""
    typical = {main: main_seconds, other: other_seconds}
    few, many = sorted((main, other), key=lambda engine: engine.run_threads)
    lengths = [len(ids) for ids in inputs]

    def seconds(cut: int | None) -> float:  # texts of `cut` tokens or more to `many`; None: none
        return sum(typical[many if cut is not None and n >= cut else few][i] for i, n in enumerate(lengths))

    alone = None if main is few else 0  # the cut that leaves every lone text to `main`
    cut = min([None, 0, *sorted(set(lengths))[1:]], key=seconds)
    if cut == alone or seconds(cut) > (1 - LONE_GAIN) * seconds(alone):
        return None, seconds(alone)
    if not all(np.array_equal(main.embed([ids]), other.embed([ids])) for ids in inputs):
        logger.warning("the two threadings gave a text different rows here; lone texts stay in one")
        return None, seconds(alone)
    span = (cut, None) if other is many else (0, cut)
    if not _split_confirmed(inputs, main, other, span):
        return None, seconds(alone)
    return span, seconds(cut)


def _split_confirmed(inputs: list[list[int]], main: Any, other: Any, span: tuple[int, int | None]) -> bool:
    """Whether `main` runs the check set, text by text, at least LONE_GAIN faster with the texts of `span`'s
    lengths sent to `other` (its own routing, OnnxEncoder.lone) than without (medians of CONFIRM_ROUNDS timings
    each, in alternating order). `main` is left without the split."""
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for round_ in range(CONFIRM_ROUNDS):
            for split in (True, False) if round_ % 2 == 0 else (False, True):
                main.lone, main.lone_tokens = (other, span) if split else (None, (0, None))
                started = time.perf_counter()
                for ids in inputs:
                    main.embed([ids])
                times[split].append(time.perf_counter() - started)
    finally:
        main.lone, main.lone_tokens = None, (0, None)
    return float(np.median(times[True])) <= (1 - LONE_GAIN) * float(np.median(times[False]))


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

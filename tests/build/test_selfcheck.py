"""The start-up proof: a model service serves the best variant whose stored check set holds on its CPU."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from functools import partial

import numpy as np
import pytest

from bentoformers.runtime import cpu, selfcheck
from bentoformers.runtime.encoder import OnnxEncoder, l2_normalize
from bentoformers.runtime.tokenizer import TextTokenizer


def test_the_stored_check_set_is_a_sample_of_the_validation_texts_with_their_reference(minilm_path, sentences):
    check = selfcheck.load(minilm_path["int8"])
    picked = selfcheck.sample(len(sentences))
    assert len(check["inputs"]) == len(picked) == selfcheck.CHECK_INPUTS
    assert check["inputs"] == TextTokenizer(minilm_path["int8"], 256).encode([sentences[i] for i in picked], True)
    # the reference is the fp32 one: the fp32 graph reproduces it
    fp32 = OnnxEncoder(minilm_path["fp32"], threads=1)
    ours = l2_normalize(fp32.embed(check["inputs"]))
    assert float((ours * np.asarray(check["reference"])).sum(axis=1).min()) >= 0.9999
    assert check["gates"] == {"min_cosine": 0.99, "mean_cosine": 0.998}


def test_a_variant_that_holds_here_is_served_and_its_figures_reported(minilm_path):
    proof = selfcheck.fastest_that_holds([("int8", minilm_path["int8"]), ("fp32", minilm_path["fp32"])], forced=False)
    assert proof.refused == [] and set(proof.timings) == {"int8", "fp32"}
    assert proof.precision == min(proof.timings, key=lambda p: proof.timings[p]["seconds"])
    assert proof.figures["min_cosine"] >= 0.99 and proof.figures["mean_cosine"] >= 0.998
    assert proof.engine.embed(json.loads((minilm_path["int8"] / selfcheck.CHECK_FILE).read_text())["inputs"][:1]).shape == (1, 384)


class ThreeTimesOver:
    """A real engine that does every call's work three times over: a variant as faithful and three times slower."""

    def __init__(self, engine):
        self.engine = engine

    def embed(self, batch):
        for _ in range(2):
            self.engine.embed(batch)
        return self.engine.embed(batch)


@pytest.mark.parametrize("slow", ["int8", "fp32"])
def test_with_auto_the_fastest_variant_that_holds_serves_and_says_why(minilm_path, slow):
    def open_(folder):
        engine = OnnxEncoder(folder, threads=1)
        return ThreeTimesOver(engine) if folder == minilm_path[slow] else engine

    proof = selfcheck.fastest_that_holds(
        [("int8", minilm_path["int8"]), ("fp32", minilm_path["fp32"])], forced=False, open_=open_
    )
    fast = "fp32" if slow == "int8" else "int8"
    assert proof.precision == fast and proof.refused == []
    assert proof.timings[slow]["seconds"] > proof.timings[fast]["seconds"]
    assert proof.why.startswith(f"the fastest that holds on this CPU ({cpu.isa_class()})")
    assert f"{slow} {proof.timings[slow]['seconds'] * 1000:.1f} ms" in proof.why
    tokens = sum(map(len, selfcheck.load(minilm_path[fast])["inputs"]))
    assert proof.tokens_per_second == pytest.approx(tokens / proof.timings[fast]["batched_seconds"], rel=1e-3)


def test_both_ways_of_using_the_cores_answer_exactly_alike(minilm_path):
    ways = OnnxEncoder(minilm_path["int8"], threads=2).threadings()
    assert sorted(ways) == [1, 2] and ways[1].workers == 2 and ways[2].workers == 1
    inputs = selfcheck.load(minilm_path["int8"])["inputs"]
    assert np.array_equal(ways[1].embed(inputs), ways[2].embed(inputs))
    assert list(OnnxEncoder(minilm_path["int8"], threads=1).threadings()) == [1]  # one core: one way


class SlowWhenShared(ThreeTimesOver):
    """A real engine whose other threading (every core on each sub-batch) does its work three times over, or the
    other way round."""

    def __init__(self, engine, slow_threads):
        super().__init__(engine)
        self.slow_threads = slow_threads

    def threadings(self):
        return {t: ThreeTimesOver(way) if t == self.slow_threads else way for t, way in self.engine.threadings().items()}


@pytest.mark.parametrize("slow_threads", [1, 2])
def test_each_variant_serves_in_its_faster_threading_and_says_so(minilm_path, slow_threads):
    proof = selfcheck.fastest_that_holds(
        [("int8", minilm_path["int8"]), ("fp32", minilm_path["fp32"])], forced=False, threadings=True,
        open_=lambda folder: SlowWhenShared(OnnxEncoder(folder, threads=2), slow_threads),
    )
    fast_threads = 3 - slow_threads
    for precision in ("int8", "fp32"):
        timing = proof.timings[precision]
        assert timing["run_threads"] == fast_threads, timing
        by = timing["seconds_by_run_threads"]
        assert by[str(slow_threads)] > by[str(fast_threads)] == timing["seconds"]
    assert not isinstance(proof.engine, ThreeTimesOver) and proof.engine.run_threads == fast_threads
    assert f"{fast_threads} ONNX Runtime thread(s) per sub-batch" in proof.why


class TimesOver:
    """A real ONNX Runtime session that runs each call `times(texts, tokens, nth)` over (`nth`: how many times these
    token ids have come, this call included), and counts calls. `times` holds no engine: no cycle left for the
    garbage collector (see tests/e2e/test_hostile_transport.py: a forked child that collected an engine died)."""

    def __init__(self, session, times):
        self.session, self.times, self.calls, self.seen = session, times, 0, Counter()

    def run(self, outputs, inputs):
        ids = inputs["input_ids"]
        self.calls += 1
        self.seen[ids.tobytes()] += 1
        for _ in range(self.times(*ids.shape, self.seen[ids.tobytes()]) - 1):
            self.session.run(outputs, inputs)
        return self.session.run(outputs, inputs)


class RunsTimes(OnnxEncoder):
    """A real encoder whose two ways run each call `times(threads, texts, tokens, nth)` over (TimesOver)."""

    def __init__(self, folder, times):
        super().__init__(folder, threads=2)
        self.times = times

    def threadings(self):
        ways = super().threadings()
        for threads, way in ways.items():
            way.session = TimesOver(way.session, partial(self.times, threads))
        return ways


def lone_faster_on(lone_threads):
    """`RunsTimes`' `times`: the `lone_threads` way runs calls of several texts three times over, the other way
    lone texts."""
    return lambda threads, texts, _, __: 3 if (texts == 1) == (threads != lone_threads) else 1


@pytest.mark.parametrize("lone_threads", [1, 2])
def test_a_call_of_one_text_runs_in_the_threading_faster_text_by_text(minilm_path, lone_threads):
    proof = selfcheck.fastest_that_holds(
        [("int8", minilm_path["int8"])], forced=True, threadings=True,
        open_=lambda folder: RunsTimes(folder, lone_faster_on(lone_threads)),
    )
    batched_threads = 3 - lone_threads
    timing, engine = proof.timings["int8"], proof.engine
    assert timing["run_threads"] == engine.run_threads == batched_threads
    assert timing["lone_run_threads"] == engine.lone.run_threads == lone_threads and timing["lone_tokens"] == [0, None]
    assert f"{batched_threads} ONNX Runtime thread(s) per sub-batch, {lone_threads} for a lone text (by" in proof.why
    # the variant's time: its best batched call and each text's median time alone, each in its faster way
    assert timing["seconds"] == pytest.approx(timing["batched_seconds"] + timing["one_by_one_seconds"], abs=2e-6)
    assert timing["seconds"] < min(timing["seconds_by_run_threads"].values())
    inputs = selfcheck.load(minilm_path["int8"])["inputs"]
    expected = OnnxEncoder(minilm_path["int8"], threads=1).embed(inputs[:3])
    lone_calls, calls = engine.lone.session.calls, engine.session.calls
    # a lone text goes to the lone way; two texts do not, and answers are the same either way
    assert np.array_equal(engine.embed(inputs[:1]), expected[:1]) and engine.lone.session.calls == lone_calls + 1
    assert np.array_equal(engine.embed(inputs[1:3]), expected[1:3]) and engine.lone.session.calls == lone_calls + 1
    assert engine.session.calls > calls


def long_lone_texts_faster_on_more(batched_threads, cut):
    """`RunsTimes`' `times`: the one-thread way runs lone texts of `cut` tokens or more three times over, the
    two-thread way shorter lone texts, and the way not `batched_threads` every call of several texts."""

    def times(threads, texts, tokens, _):
        slow = threads != batched_threads if texts > 1 else (tokens >= cut) == (threads == 1)
        return 3 if slow else 1

    return times


@pytest.mark.parametrize("batched_threads", [1, 2])
def test_a_lone_text_runs_in_the_threading_faster_at_its_length(minilm_path, batched_threads):
    inputs = selfcheck.load(minilm_path["int8"])["inputs"]
    cut = sorted(map(len, inputs))[len(inputs) // 2]  # half the check set's texts on either side
    proof = selfcheck.fastest_that_holds(
        [("int8", minilm_path["int8"])], forced=True, threadings=True,
        open_=lambda folder: RunsTimes(folder, long_lone_texts_faster_on_more(batched_threads, cut)),
    )
    timing, engine = proof.timings["int8"], proof.engine
    assert engine.run_threads == batched_threads and engine.lone.run_threads == 3 - batched_threads
    # lone texts of `cut` tokens or more on both cores, shorter ones on one
    span = [cut, None] if batched_threads == 1 else [0, cut]
    assert timing["lone_tokens"] == span and list(engine.lone_tokens) == span
    way = f"of {cut} tokens or more" if batched_threads == 1 else f"under {cut} tokens"
    assert f"{batched_threads} ONNX Runtime thread(s) per sub-batch, {3 - batched_threads} for a lone text {way}" in proof.why
    short, long = min(inputs, key=len), max(inputs, key=len)
    expected = OnnxEncoder(minilm_path["int8"], threads=1).embed([short, long])
    for text, row, on_two in ((short, expected[0], False), (long, expected[1], True)):
        two = engine if batched_threads == 2 else engine.lone
        calls = two.session.calls
        assert np.array_equal(engine.embed([text])[0], row)
        assert two.session.calls == calls + on_two


def fast_now_and_then(threads, texts, _, nth):
    """One thread: every call twice over. Two threads: five times over (slower than one even where two would halve
    the time), but a one-text call once on every third run of its ids (a sleeping second thread that now and then
    wakes fast)."""
    return 2 if threads == 1 else 1 if texts == 1 and nth % 3 == 0 else 5


def fast_while_timed(threads, texts, _, nth):
    """One thread: every call twice over. Two threads: a one-text call once for as many runs of its ids as the
    start-up timing and its check that both ways agree make, then five times over; calls of several texts five
    times over."""
    return 2 if threads == 1 else 1 if texts == 1 and nth <= selfcheck.TIMING_ROUNDS + 1 else 5


def test_a_lone_threading_fast_only_now_and_then_is_not_taken(minilm_path):
    # the best of the rounds would send lone texts to two threads (once against twice over); typically they run
    # five times over there
    proof = selfcheck.fastest_that_holds(
        [("int8", minilm_path["int8"])], forced=True, threadings=True,
        open_=lambda folder: RunsTimes(folder, fast_now_and_then),
    )
    timing, engine = proof.timings["int8"], proof.engine
    assert timing["rounds"] >= 3 and engine.run_threads == 1
    assert engine.lone is None and "lone_run_threads" not in timing and "for a lone text" not in proof.why


def test_a_lone_threading_fast_only_while_timed_is_not_kept(minilm_path):
    # the timing rounds see two threads run lone texts once against twice over, and propose them; timed once
    # more, routed against not, they run five times over, and the split is dropped
    proof = selfcheck.fastest_that_holds(
        [("int8", minilm_path["int8"])], forced=True, threadings=True,
        open_=lambda folder: RunsTimes(folder, fast_while_timed),
    )
    timing, engine = proof.timings["int8"], proof.engine
    assert engine.run_threads == 1 and engine.lone is None and "lone_run_threads" not in timing
    # the split was proposed: each text ran alone once per round, once more to compare rows, then the confirmation
    assert max(engine.session.seen.values()) >= timing["rounds"] + 1 + selfcheck.CONFIRM_ROUNDS


def test_a_forced_precision_serves_even_when_slower_and_is_still_timed(minilm_path):
    proof = selfcheck.fastest_that_holds(
        [("int8", minilm_path["int8"])], forced=True, open_=lambda folder: ThreeTimesOver(OnnxEncoder(folder, threads=1))
    )
    assert proof.precision == "int8" and proof.why.startswith("asked for") and proof.tokens_per_second > 0


@pytest.fixture
def unmeetable_int8(minilm_path, tmp_path):
    """The real int8 variant with gates it cannot meet: what a CPU that computes it differently would see."""
    folder = tmp_path / "int8"
    shutil.copytree(minilm_path["int8"], folder)
    check = selfcheck.load(folder)
    check["gates"] = {"min_cosine": 1.0, "mean_cosine": 1.0}
    (folder / selfcheck.CHECK_FILE).write_text(json.dumps(check))
    return folder


def test_a_variant_below_its_gate_on_this_cpu_falls_back_to_the_next(unmeetable_int8, minilm_path):
    refusals = []
    proof = selfcheck.fastest_that_holds(
        [("int8", unmeetable_int8), ("fp32", minilm_path["fp32"])], forced=False,
        on_refusal=lambda precision, reason: refusals.append((precision, reason)),
    )
    assert proof.precision == "fp32" and proof.figures["min_cosine"] >= 0.9999
    (refused,) = proof.refused
    assert refused["precision"] == "int8" and refusals == [("int8", refused["reason"])]
    assert f"on this CPU ({cpu.isa_class()})" in refused["reason"] and "min_cosine" in refused["reason"]


def test_a_forced_precision_below_its_gate_refuses_to_start(unmeetable_int8):
    with pytest.raises(RuntimeError, match="precision int8 was asked for, but it is below its gate on this CPU"):
        selfcheck.fastest_that_holds([("int8", unmeetable_int8)], forced=True)


def test_the_check_runs_as_a_command_and_says_what_failed(unmeetable_int8, minilm_path):
    import subprocess
    import sys

    def run(folder):
        done = subprocess.run([sys.executable, "-m", "bentoformers.runtime.selfcheck", str(folder)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert run(minilm_path["int8"])["failures"] == []
    failures = run(unmeetable_int8)["failures"]
    assert len(failures) == 2 and failures[0].startswith("min_cosine 0.99")

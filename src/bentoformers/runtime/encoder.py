"""Runs a built encoder graph (model-service side): pooled embeddings, or a classifier's logits (per text, or
per token for token classification).

No BentoML here, so the build step, the service and the benchmark all use the same code.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bentoformers.runtime.card import ONNX_FILE, ModelCard
from bentoformers.runtime.cpu import usable_cores
from bentoformers.runtime.session import ENCODER_CPU_DISABLED_OPTIMIZERS, open_session
from bentoformers.runtime.tokenizer import SECOND_SEGMENT
from bentoformers.tasks import TASKS

CUDA_SUB_BATCH_TOKENS = (4_096, 16_384, 65_536)  # tried at start on a GPU (size_sub_batches)
logger = logging.getLogger("bentoformers")
POOLED_OUTPUT = "sentence_embedding"  # an embeddings graph's pooled output (build/export.py appends the pooling)
SPARSE_OUTPUT = "sparse_max"  # a SPLADE graph's (build/export.py append_splade_pooling)


class OnnxEncoder:
    """Runs a built encoder graph: pooled embeddings, or a classifier's logits (a row per text; for token
    classification a row per token, padded with zeros to the call's longest text).

    Texts run in length-sorted sub-batches (little padding) under a token budget. On CPU the sub-batches run
    side by side, one per core, each on a single ONNX Runtime thread (`run_threads`, 1 by default) of one shared
    session; a call with fewer sub-batches than cores is split further, so every core gets a part of any call
    of at least as many texts (a lone text runs on one).
    Measured here against one session whose threads all work on each sub-batch in turn (2-core Zen 4, MiniLM
    int8): a lone short text 2.56 -> 2.07 ms, 32 texts a call +9 %, 128 texts +31 %, and no worse with another
    process taking a core. Threads that share each operator must meet after every one of them, and a thread
    that was put to sleep or lost its core to the event loop stalls the other; side by side nothing waits.
    A lone long text pays (one core: 256 tokens 25 -> 33 ms here); `run_threads` = the cores puts them all
    on each sub-batch, one at a time (values between run `cores // run_threads` sub-batches at once that share
    the session's `run_threads - 1` pool threads). A text's result never depends on its batch: padding is masked, and int8 graphs quantize each
    token's activations on their own (build/quantize.py), so no scale is shared between rows. The tests check
    it with `np.array_equal`, at one and at several threads. A sub-batch holds at most `max_batch_tokens` padded
    tokens: ONNX Runtime's memory arena keeps the largest activations it has seen, so this bounds the memory of
    a long-running service (at 16k tokens per sub-batch, MiniLM's attention alone took over 200 MB).
    """

    def __init__(
        self,
        folder: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        max_batch_tokens: int | None = None,
        spinning: bool = False,
        run_threads: int = 1,
    ) -> None:
        """`threads`: the cores to use (default: every usable one); `run_threads`: ONNX Runtime threads per
        sub-batch, so `threads // run_threads` sub-batches run at once. `spinning` off (unlike ONNX Runtime's
        default): threads sleep between operators instead of spinning, which on a CPU shared with the gateway's
        event loop and its clients served 20-26 % more texts/s under load (README, Benchmark)."""
        self.folder = Path(folder)
        self.card = ModelCard.load(folder)
        self.device = device
        # On a GPU, bigger sub-batches keep it busy; its memory is the CUDA arena's, sized by the card.
        self.max_batch_tokens = max_batch_tokens or (16_384 if device == "cuda" else 2048)
        self.cores, self.spinning = threads or usable_cores(), spinning
        run_threads = max(1, min(run_threads, self.cores))
        # on CUDA sub-batches go one after another, each with the whole GPU
        self.workers = 1 if device == "cuda" else max(1, self.cores // run_threads)
        self.session = open_session(
            self.folder / ONNX_FILE, device, intra_op_threads=0 if device == "cuda" else run_threads,
            inter_op_threads=1, spinning=spinning, cpu_disabled_optimizers=ENCODER_CPU_DISABLED_OPTIMIZERS,
        )
        self.run_threads = run_threads
        # the same graph in another threading, for a call of one text whose length lies in `lone_tokens` (from,
        # below; None: no bound), where that threading runs it faster: set by the start-up timing (runtime/selfcheck.py)
        self.lone: OnnxEncoder | None = None
        self.lone_tokens: tuple[int, int | None] = (0, None)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnx")
        self._input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        output = TASKS[self.card.task].output
        self._per_token = output == "token-logits"
        # Graphs built since the pooling moved into the graph give `sentence_embedding`; older ones the hidden
        # state, pooled here.
        self._pool_here = output == "pooled" and POOLED_OUTPUT not in outputs
        wanted = "last_hidden_state" if self._pool_here else POOLED_OUTPUT if output == "pooled" else "logits"
        self._sparse = output == "sparse"
        if self._sparse:
            wanted = SPARSE_OUTPUT
            # Inside the session a sub-batch's logits are (tokens, vocabulary): 2048 tokens of BERT's are 250 MB.
            self.max_batch_tokens = min(self.max_batch_tokens, 512)
        self._output = wanted if wanted in outputs else outputs[0]

    def threadings(self) -> dict[int, OnnxEncoder]:
        """This engine by its threads per sub-batch, beside the same graph with the other way of using the cores
        (every core on each sub-batch, or one each side by side): the start-up timing serves the faster
        (runtime/selfcheck.py). Only this engine on CUDA or a single core."""
        if self.device == "cuda" or self.cores < 2:
            return {self.run_threads: self}
        other = self.cores if self.run_threads == 1 else 1
        twin = OnnxEncoder(self.folder, self.device, self.cores, self.max_batch_tokens, self.spinning, run_threads=other)
        return {self.run_threads: self, other: twin}

    def _runs_lone(self, batch: list[list[int]]) -> bool:
        if len(batch) != 1 or self.lone is None:
            return False
        low, high = self.lone_tokens
        return low <= len(batch[0]) and (high is None or len(batch[0]) < high)

    def lone_way(self) -> str:
        """How a call of one text runs where that differs from other calls ("" where it does not)."""
        if self.lone is None:
            return ""
        low, high = self.lone_tokens
        if high is not None:
            span = f" under {high} tokens" if low == 0 else f" of {low} to {high - 1} tokens"
        else:
            span = f" of {low} tokens or more" if low else ""
        return f"{self.lone.run_threads} for a lone text{span}"

    def size_sub_batches(
        self, texts: list[list[int]], budgets: tuple[int, ...] = CUDA_SUB_BATCH_TOKENS, calls: int = 3
    ) -> dict[str, object]:
        """Sets `max_batch_tokens` by measurement: `texts` (a model call's worth: the check set repeated) run in
        sub-batches of each budget, best of `calls`; the smallest budget within 5 % of the best rate serves
        (the sooner a call's first sub-batch is done). Sizes are tried from the smallest, and the search ends
        at the first that gains less than 5 % or fails (out of device memory): ONNX Runtime's arena keeps the
        largest size run, so larger ones are not tried for nothing. What the tuned CPU plan does not know on a GPU: there a bigger
        sub-batch costs little more than a small one until the device is full. Sparse models keep their cap
        (their sub-batches' logits are vocabulary-wide)."""
        if self._sparse:
            return {}
        rates: dict[int, float] = {}
        tokens, before = sum(map(len, texts)), self.max_batch_tokens
        for budget in sorted(budgets):
            self.max_batch_tokens = budget
            try:
                self.embed(texts)  # warm-up: the arena grows to this size
                best = min(_timed(self.embed, texts) for _ in range(calls))
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for out of memory
                logger.warning("sub-batches of %d tokens failed (%s); keeping the smaller ones", budget, exc)
                break
            rates[budget] = tokens / max(best, 1e-9)
            if len(rates) > 1 and rates[budget] < 1.05 * max(r for b, r in rates.items() if b != budget):
                break  # no longer paying: larger sizes would only grow the memory arena (it does not shrink)
        if not rates:
            self.max_batch_tokens = before
            logger.warning("no sub-batch size of %s ran; keeping %d tokens", budgets, before)
            return {}
        top = max(rates.values())
        self.max_batch_tokens = min(b for b, rate in rates.items() if rate >= 0.95 * top)
        return {"sub_batch_tokens": self.max_batch_tokens, "tokens_per_second_by_sub_batch_tokens": {
            str(b): round(r, 1) for b, r in rates.items()
        }}

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """Token ids in, float32 rows out (one per input, same order): pooled embeddings or logits."""
        if self._runs_lone(batch):
            return self.lone.embed(batch)
        width = (self.card.dimensions,)
        if self._per_token:
            width = (max(map(len, batch), default=0), self.card.dimensions)
        out = np.zeros((len(batch), *width), dtype=np.float32)
        if not batch:
            return out
        groups = self._plan(batch)
        results = [self._run([batch[i] for i in groups[0]])] if len(groups) == 1 else self._pool.map(
            lambda g: self._run([batch[i] for i in g]), groups
        )
        for group, rows in zip(groups, results):
            if self._per_token:
                out[group, : rows.shape[1]] = rows
            else:
                out[group] = rows
        return out

    def _plan(self, batch: list[list[int]]) -> list[list[int]]:
        """Length-sorted groups whose padded size fits the token budget and whose padding stays small, the
        largest of those holding two texts or more halved until every worker has one (or none is left to halve)."""
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        groups: list[list[int]] = []
        group: list[int] = []
        for i in order:
            length = len(batch[i])
            if group and (
                (len(group) + 1) * length > self.max_batch_tokens
                or length > len(batch[group[0]]) * 1.25 + 4
            ):
                groups.append(group)
                group = []
            group.append(i)
        groups.append(group)
        while len(groups) < self.workers:
            splittable = [g for g in groups if len(g) > 1]
            if not splittable:
                break
            largest = max(splittable, key=lambda g: len(g) * len(batch[g[-1]]))
            groups.remove(largest)
            half = len(largest) // 2
            groups += [largest[:half], largest[half:]]
        return groups

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        inputs = feed(seqs, self._input_names)
        if self.device == "cuda":
            out = run_bound(self.session, self._output, inputs, "cuda")
        else:
            out = self.session.run([self._output], inputs)[0]
        out = out.astype(np.float32, copy=False)
        if self._sparse:  # SPLADE: the graph gives relu(max logit) per term (build/export.py append_splade_pooling)
            return np.log1p(out)
        return pool(out, inputs["attention_mask"], self.card.pooling) if self._pool_here else out

    classify = embed


def _timed(call, argument) -> float:
    started = time.perf_counter()
    call(argument)
    return time.perf_counter() - started


def run_bound(session, output: str, inputs: dict[str, np.ndarray], device: str) -> np.ndarray:
    """One output of a run through ONNX Runtime's I/O binding: the output is bound on `device` and only it is
    copied to the host (the service uses this on CUDA; the tests run it on CPU)."""
    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output(output, device)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def feed(seqs: list[list[int]], input_names: set[str]) -> dict[str, np.ndarray]:
    """A graph's inputs for sequences of token ids, padded to the longest: ids, attention mask and, where the
    graph takes them, token types (1 for a pair's second text, whose ids arrive offset by SECOND_SEGMENT)."""
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    types, ids = np.divmod(ids, SECOND_SEGMENT)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names:
        inputs["token_type_ids"] = types
    return inputs


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        return hidden[:, 0]
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis."""
    logits = logits.astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def label_scores(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """A classifier's logits as scores: a sigmoid per label for multi-label models, else a softmax."""
    return sigmoid(logits) if multi_label else softmax(logits)

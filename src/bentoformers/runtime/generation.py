"""Continuous batching for a causal LM (model-service side): concurrent sequences decode together.

Each request's prompt is prefilled alone, then the sequence joins the running batch between two decoding
steps; every step produces one token for every active sequence. Waiting sequences are admitted round-robin by
caller (the identity the gateway names), so one caller's many sequences never starve another's; while a
sequence waits, its consumer hears "waiting" now and then, so a long queue is not mistaken for a stalled model. A sequence leaves the batch when it
ends (end-of-sequence token, its token budget, the context) or when its consumer goes away, so a client
that disconnects stops its generation at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from bentoformers.runtime.decoder import DecodeBatch, OnnxDecoder

CANCELLED_KEYS_KEPT = 4096

logger = logging.getLogger("bentoformers.generation")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """A token for any logits and any temperature: where the arithmetic cannot give a distribution (NaN or
    +inf logits), the most likely finite token. A -inf logit is a probability of 0."""
    logits = logits.astype(np.float64)
    finite = np.isfinite(logits)
    best = int(np.argmax(np.where(finite, logits, -np.inf))) if finite.any() else 0
    if sampling.temperature <= 0 or np.isnan(logits).any() or np.isposinf(logits).any():
        return best
    # Shifted before the division: every value is <= 0 with a 0 at the best token, so no temperature,
    # however small, overflows (1e-308 once turned every probability into NaN).
    with np.errstate(over="ignore", invalid="ignore"):  # far below the best: -inf, a probability of 0
        scaled = (logits - logits[best]) / sampling.temperature
    if 0 < sampling.top_k < len(scaled):
        cutoff = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled)
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]  # the smallest set reaching top_p
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    if not np.isfinite(probs).all():
        return best
    return int(rng.choice(len(probs), p=probs))


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    rng: np.random.Generator
    events: asyncio.Queue[tuple[str, int | str]] = field(default_factory=asyncio.Queue)
    caller: str = ""
    admitted: bool = False
    generated: int = 0
    last: int = -1
    finish: str | None = None
    gone: bool = False  # the consumer went away


class Scheduler:
    def __init__(
        self, decoder: OnnxDecoder, eos_token_ids: tuple[int, ...], context: int, max_active: int, step_seconds=None,
        on_step=None, max_waiting: int | None = None, waiting_note_seconds: float = 10.0,
    ) -> None:
        self.decoder = decoder
        self.eos = set(eos_token_ids)
        self.context = context
        self.max_active = max_active
        # With every active place taken and this many waiting, a new sequence ends at once with "overloaded":
        # each gateway bounds its own generations, but several gateway workers or replicas share this queue.
        self.max_waiting = max_waiting
        self.waiting_note_seconds = waiting_note_seconds  # how often a waiting sequence's consumer hears "waiting"
        self._admissions = 0
        self._last_admitted: dict[str, int] = {}  # caller -> the admission count at its last admission
        # Keys cancelled before their sequence arrived (the cancel call can overtake the generate call): such a
        # sequence ends at once. Oldest forgotten first, past a bound.
        self._cancelled_early: OrderedDict[str, None] = OrderedDict()
        self.step_seconds = step_seconds  # a histogram (metrics.inference_seconds) of each step's time
        self.on_step = on_step  # on_step(active sequences, new tokens) after each step, for metrics
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._batch: DecodeBatch | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._by_key: dict[str, _Sequence] = {}
        self.steps = 0  # decoding steps run, and the rows they held: a batching figure for tests and metrics
        self.rows_stepped = 0
        self.prefills = 0

    async def generate(
        self, prompt: list[int], max_new_tokens: int, sampling: Sampling, key: str = "", caller: str = ""
    ) -> AsyncIterator[tuple[str, int | str]]:
        """("token", id) events, then one ("finish", "stop" | "length") or ("error", message); ("waiting", "")
        every `waiting_note_seconds` while the sequence waits for a place.

        `key` names the sequence for cancel(): a consumer in another process cannot rely on its
        disconnect reaching this generator.
        """
        if key and (key in self._cancelled_early or key.partition(":")[0] in self._cancelled_early):
            yield "finish", "cancelled"
            return
        if self.max_waiting is not None and (  # sequences whose consumer left are dropped at the next step
            sum(not s.gone for s in (*self._waiting, *self._active)) >= self.max_active + self.max_waiting
        ):
            yield "finish", "overloaded"
            return
        seq = _Sequence(prompt, max_new_tokens, sampling, np.random.default_rng(sampling.seed), caller=caller)
        if key:
            self._by_key[key] = seq
        self._waiting.append(seq)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop())
        try:
            while True:
                try:
                    async with asyncio.timeout(None if seq.admitted else self.waiting_note_seconds):
                        kind, value = await seq.events.get()
                except TimeoutError:
                    if not seq.admitted:
                        yield "waiting", ""
                    continue
                yield kind, value
                if kind != "token":
                    return
        finally:
            seq.gone = True
            if self._by_key.get(key) is seq:  # a retried call (gateway/endpoint.py) may have taken the key since
                del self._by_key[key]

    async def generate_n(
        self, prompt: list[int], max_new_tokens: int, samplings: list[Sampling], key: str = "", caller: str = ""
    ) -> AsyncIterator[tuple[int, str, int | str]]:
        """`len(samplings)` choices of one prompt, decoding together: (choice, kind, value) events, each
        choice's as generate() gives them. Their sequences are queued at once, so they are admitted in one
        step and share the prompt's prefill. Choice i's key is f"{key}:{i}"; cancel(key) stops them all."""
        merged: asyncio.Queue[tuple[int, str, int | str]] = asyncio.Queue()

        async def pump(index: int, sampling: Sampling) -> None:
            choice_key = f"{key}:{index}" if key else ""
            async for kind, value in self.generate(prompt, max_new_tokens, sampling, choice_key, caller):
                merged.put_nowait((index, kind, value))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(samplings)]
        try:
            for _ in samplings:
                while True:
                    index, kind, value = await merged.get()
                    yield index, kind, value
                    if kind not in ("token", "waiting"):
                        break
        finally:
            for task in tasks:
                task.cancel()  # their generators' cleanup marks each sequence gone

    def cancel(self, key: str) -> bool:
        """Stops a sequence (or all choices of a generate_n call) at the next step; False if unknown (never
        started, or already over)."""
        keys = [k for k in self._by_key if k == key or k.startswith(f"{key}:")]
        for seq in [self._by_key.pop(k) for k in keys]:
            seq.gone = True
            seq.events.put_nowait(("finish", "cancelled"))  # ends the stream now, if anyone still reads it
        if not keys:  # not here yet, or over: if it comes later, it ends at once
            self._cancelled_early[key] = None
            while len(self._cancelled_early) > CANCELLED_KEYS_KEPT:
                self._cancelled_early.popitem(last=False)
        return bool(keys)

    async def _loop(self) -> None:
        while self._waiting or self._active:
            admitted = self._admit(self.max_active - len(self._active))
            started = time.perf_counter()
            try:
                events = await asyncio.to_thread(self._tick, admitted)
            except Exception as exc:  # every sequence in flight learns of it; the loop goes on for new ones
                logger.exception("decoding step failed")
                for seq in [*self._active, *admitted]:
                    seq.events.put_nowait(("error", f"decoding failed: {exc.__class__.__name__}"))
                self._active, self._batch = [], None
                if self.on_step is not None:
                    self.on_step(0, 0)
                continue
            if self.step_seconds is not None:
                self.step_seconds.observe(time.perf_counter() - started)
            if self.on_step is not None:
                running = sum(1 for seq in self._active if seq.finish is None and not seq.gone)
                self.on_step(running, sum(1 for _, kind, _ in events if kind == "token"))
            for seq, kind, value in events:
                seq.events.put_nowait((kind, value))

    def _admit(self, room: int) -> list[_Sequence]:
        """Up to `room` waiting sequences, round-robin by caller: the caller admitted longest ago first, each
        caller's own in the order they came (a request's choices together, so they share their prefill)."""
        if room <= 0 or not self._waiting:  # every decoding step comes here: nothing to do while no place is free
            return []
        self._waiting = deque(seq for seq in self._waiting if not seq.gone)
        queues: dict[str, deque[_Sequence]] = {}
        for seq in self._waiting:
            queues.setdefault(seq.caller, deque()).append(seq)
        turns = deque(sorted(queues, key=lambda caller: self._last_admitted.get(caller, -1)))
        admitted: list[_Sequence] = []
        while turns and len(admitted) < room:
            caller = turns.popleft()
            seq = queues[caller].popleft()
            admitted.append(seq)
            seq.admitted = True
            self._admissions += 1
            self._last_admitted[caller] = self._admissions
            if queues[caller]:
                turns.append(caller)
        chosen = set(map(id, admitted))
        self._waiting = deque(seq for seq in self._waiting if id(seq) not in chosen)
        if len(self._last_admitted) > CANCELLED_KEYS_KEPT:  # callers long gone are forgotten
            waiting = {seq.caller for seq in self._waiting}
            self._last_admitted = {c: n for c, n in self._last_admitted.items() if c in waiting}
        return admitted

    def _tick(self, admitted: list[_Sequence]) -> list[tuple[_Sequence, str, int | str]]:
        """One decoding step for the running batch, then the new prompts' prefills (in a worker thread)."""
        events: list[tuple[_Sequence, str, int | str]] = []
        keep = [i for i, seq in enumerate(self._active) if seq.finish is None and not seq.gone]
        left = [seq for seq in self._active if seq.gone and seq.finish is None]
        if left:
            logger.info("stopped %d sequence(s) whose client went away, after %s new tokens", len(left),
                        ", ".join(str(seq.generated) for seq in left))
        if len(keep) < len(self._active):
            self._active = [self._active[i] for i in keep]
            self._batch = self._batch.keep(keep) if keep and self._batch is not None else None
        if self._active and self._batch is not None:
            logits, self._batch = self.decoder.step(self._batch, np.array([seq.last for seq in self._active]))
            self.steps += 1
            self.rows_stepped += len(self._active)
            for row, seq in enumerate(self._active):
                with self._alone(seq, events):
                    self._emit(seq, sample(logits[row], seq.sampling, seq.rng), int(self._batch.positions[row]), events)
        prefills: dict[tuple[int, ...], tuple[np.ndarray, DecodeBatch]] = {}
        for seq in admitted:
            with self._alone(seq, events):
                # The same prompt admitted together (a request's n choices) is prefilled once.
                key = tuple(seq.prompt)
                if key not in prefills:
                    prefills[key] = self.decoder.prefill(seq.prompt)
                    self.prefills += 1
                logits, one = prefills[key]
                self._emit(seq, sample(logits, seq.sampling, seq.rng), len(seq.prompt), events)
                if seq.finish is None:
                    self._batch = DecodeBatch.join(self._batch, one)
                    self._active.append(seq)
        return events

    @contextmanager
    def _alone(self, seq: _Sequence, events: list) -> Iterator[None]:
        """One sequence's own work (its prefill, its sampling): a failure ends that sequence, not its neighbours."""
        try:
            yield
        except Exception as exc:
            logger.exception("a sequence failed; its neighbours go on")
            seq.finish = "error"
            events.append((seq, "error", f"decoding failed: {exc.__class__.__name__}"))

    def _emit(self, seq: _Sequence, token: int, position: int, events: list) -> None:
        """`position` is where `token` sits in the sequence; the context ends at self.context."""
        seq.generated += 1
        seq.last = token
        if token in self.eos:
            seq.finish = "stop"
        else:
            events.append((seq, "token", token))
            if seq.generated >= seq.max_new_tokens or position + 1 >= self.context:
                seq.finish = "length"
        if seq.finish is not None:
            events.append((seq, "finish", seq.finish))

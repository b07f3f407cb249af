"""Gateway-side batching: concurrent requests become one call to the model service.

While a call is in flight, new requests queue; when it returns, everything queued (up to the item and
token budgets) goes in the next call. A lone request therefore goes straight through, and under load
the batches grow by themselves. One call in flight per gateway worker also keeps BentoML's adaptive
batcher in the model service from learning to wait for company.

The queue is bounded by time: from the tokens per second the model's recent calls ran at, a request
whose expected wait (what is left of the call in flight, the tokens queued ahead of it, and its own) would
pass `max_wait` seconds is refused at once with 503 and Retry-After (and by count, `max_queued` texts, as a
backstop). The first request in the queue is always admitted, so calls go on and a stale rate mends. Before
any call has taught a rate (the first burst after a start) only the count bounds it: refusing there on a
guess turned most of a cold server's first burst away. A refusal costs microseconds, and is made before
tokenizing too, with the request's tokens estimated from the recent tokens per text.

What the rate does not see (the event loop's own lag under a flood, the hops between calls) is measured
instead: each request that waited compares the time it really spent queued with what the rate expected
when it was admitted, and the work queued ahead is counted at the recent high side of that ratio (`lag`:
at least 1, quick to rise, slow to fall, and back towards 1 with a half-life of `LAG_HALF_LIFE` seconds
when no wait measures it). The promise is about the real waits, so it is checked against them.

And it is kept at the other end: a request still queued when its time is up (it has waited `max_wait` less how
long a call and the way back to the event loop have recently taken, on their high side, and at least half of
`max_wait`) is answered 503 with Retry-After instead of being run
(Triton's queue timeout with its REJECT action does the same), so a request is not run to be answered late.
A request that waited unread on its connection after a 503 (serving/connection_limits.py holds a connection
for its Retry-After) has that much less time: its client sent it when the hold began.

The rate is the recent best, not an average: a call never runs faster than the model can, so any faster
call raises it at once, and a slow full call (its texts long, the CPU shared for a moment) lowers it by at
most a tenth. An average let one slow call refuse work for as long as the refusals kept the queue too
short to produce the full calls it learned from. Until a full call (one the budgets cut) has run, the best
rate of any call stands in: a lone call's is slower per token, so it refuses early rather than late.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from bentoformers.errors import ApiError, ErrorType
from bentoformers.observability import metrics, tracing

MIN_MEASURED_WAIT = 0.05  # seconds: a shorter expected wait is mostly fixed costs, not the rate's error
MAX_LAG = 20.0
LAG_HALF_LIFE = 30.0  # seconds
ModelCall = Callable[[list[list[int]]], Awaitable[np.ndarray]]


@dataclass
class _Job:
    seqs: list[list[int]]
    tokens: int
    future: asyncio.Future[np.ndarray]
    queued_at: float
    trace: tracing.RequestTrace | None  # the request's (observability/tracing.py): its stages and spans
    started: float  # when it was queued, less any time its connection held it unread
    expected: float = 0.0  # its time in the queue as the rate alone expected it when it was admitted (no lag)
    called_at: float = 0.0  # when its batch's model call began


class Coalescer:
    def __init__(
        self,
        call: ModelCall,
        *,
        max_items: int,
        max_tokens: int,
        max_queued: int,
        retry_after: int,
        max_wait: float = float("inf"),
        model: str = "default",
    ) -> None:
        self._call = call
        self.model = model  # the metrics label
        self.max_items, self.max_tokens, self.max_queued = max_items, max_tokens, max_queued
        self.max_wait, self.retry_after = max_wait, retry_after
        self._pending: deque[_Job] = deque()
        self.queued_items = self.queued_tokens = 0
        self.tokens_per_second: float | None = None  # of the model's full calls: the recent best (_learn_rate)
        self._any_call_rate: float | None = None  # the best of any call, until a full call has run
        self._tokens_per_item = 0.0  # of recent requests: a request's tokens before it is tokenized
        self._in_flight_tokens = 0
        self._in_flight_since = 0.0
        self._lag, self._lag_at = 1.0, 0.0  # real queue times over the rate's expectation, at _lag_at (_learn_lag)
        self._tail = 0.0  # seconds from a call's start to its answers back on the event loop, on the high side
        self._drainer: asyncio.Task[None] | None = None

    def expected_wait(self, tokens: int = 0) -> float:
        """Seconds until a request of `tokens` queued now would be answered: what is left of the call in flight,
        the queued tokens (those two times the measured lag) and its own, at the recent rate (0 before any call)."""
        rate = self._rate
        if not rate:
            return 0.0
        return (self._ahead(rate) * self.lag + tokens) / rate

    @property
    def _rate(self) -> float | None:
        """Tokens per second for expectations: the full calls' recent best, or any call's until a full one ran."""
        return self.tokens_per_second or self._any_call_rate

    def _ahead(self, rate: float) -> float:
        """Tokens before a request queued now: what is left of the call in flight, and the queued ones."""
        return max(0.0, self._in_flight_tokens - (time.perf_counter() - self._in_flight_since) * rate) + self.queued_tokens

    @property
    def lag(self) -> float:
        """The measured lag, relaxing towards 1 while no request's wait measures it."""
        return 1.0 + (self._lag - 1.0) * 0.5 ** ((time.perf_counter() - self._lag_at) / LAG_HALF_LIFE)

    def check_room(self, items: int, tokens: int = 0) -> None:
        """503 + Retry-After when `items` texts of `tokens` would not fit the queue. Called before tokenizing
        too (tokens 0: estimated from the recent tokens per text), so a flood's refusals cost no tokenizing on
        the event loop; `submit` checks again with the real count."""
        tokens = tokens or round(items * self._tokens_per_item)
        if self.queued_items and (
            self.queued_items + items > self.max_queued
            or self.expected_wait(tokens) + _held(tracing.current()) > self.max_wait
        ):
            metrics.count_rejection("queue_full")
            raise self._overloaded(f"{self.queued_items} texts queued, about {self.expected_wait():.1f}s of work")

    def _overloaded(self, why: str) -> ApiError:
        return ApiError(
            ErrorType.OVERLOADED, f"the server is at capacity ({why}); retry after {self.retry_after}s",
            headers={"Retry-After": str(self.retry_after)},
        )

    async def submit(self, seqs: list[list[int]]) -> np.ndarray:
        tokens = sum(map(len, seqs))
        self.check_room(len(seqs), tokens)
        per_item = tokens / max(1, len(seqs))
        self._tokens_per_item += (0.1 if self._tokens_per_item else 1.0) * (per_item - self._tokens_per_item)
        now, trace = time.perf_counter(), tracing.current()
        job = _Job(seqs, tokens, asyncio.get_running_loop().create_future(), now, trace, now - _held(trace))
        rate = self._rate
        job.expected = self._ahead(rate) / rate if rate else 0.0
        self._pending.append(job)
        self._queued(len(seqs), tokens)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        try:
            rows = await job.future
            answered = time.perf_counter()
            self._learn_lag(job.expected, job.called_at - job.queued_at)
            tail = answered - job.called_at  # up at once, down slowly: the deadline below must not be optimistic
            self._tail = tail if tail > self._tail else self._tail + 0.05 * (tail - self._tail)
            return rows
        finally:
            if job.trace is not None and job.called_at:
                job.trace.add("queue", job.called_at - job.queued_at)
                job.trace.add("inference", time.perf_counter() - job.called_at)

    async def _drain(self) -> None:
        while self._pending:
            jobs = self._take()
            if not jobs:
                continue
            saturated = bool(self._pending)  # the budgets cut this call: it runs at the model's batched rate
            seqs = [seq for job in jobs for seq in job.seqs]
            self._observe(jobs, seqs)
            started = self._in_flight_since = time.perf_counter()
            self._in_flight_tokens = sum(job.tokens for job in jobs)
            for job in jobs:
                job.called_at = started
            batch = {
                "bentoformers.batch.requests": len(jobs), "bentoformers.batch.items": len(seqs),
                "bentoformers.batch.tokens": self._in_flight_tokens,
                "bentoformers.batch.padded_tokens": len(seqs) * max(map(len, seqs)),
            }
            try:
                with tracing.model_call([job.trace for job in jobs], [job.queued_at for job in jobs], batch):
                    rows = await self._call(seqs)
            except Exception as exc:  # every waiter gets the failure; the drainer goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self._in_flight_tokens = 0
            self._learn_rate(sum(job.tokens for job in jobs), time.perf_counter() - started, saturated)
            start = 0
            for job in jobs:
                end = start + len(job.seqs)
                if not job.future.done():
                    job.future.set_result(rows[start:end])
                start = end

    def _take(self) -> list[_Job]:
        """Whole requests in arrival order, within the budgets (the first one always fits); those whose time is
        up are answered 503 instead."""
        jobs: list[_Job] = []
        items = tokens = 0
        now = time.perf_counter()
        # started before this: too late to run (its call and the way back would pass max_wait). At least half of
        # max_wait, so one call longer than the promise does not refuse everything after it
        latest = now - max(self.max_wait / 2, self.max_wait - self._tail)
        while self._pending:
            job = self._pending[0]
            if jobs and (items + len(job.seqs) > self.max_items or tokens + job.tokens > self.max_tokens):
                break
            self._pending.popleft()
            self._queued(-len(job.seqs), -job.tokens)
            if job.future.done():  # the client went away while it waited
                continue
            if job.started < latest:
                metrics.count_rejection("queue_timeout")
                job.future.set_exception(self._overloaded(
                    f"this request has waited {now - job.started:.1f}s and would be answered past its {self.max_wait:g}s"
                ))
                continue
            jobs.append(job)
            items += len(job.seqs)
            tokens += job.tokens
        return jobs

    def _queued(self, items: int, tokens: int) -> None:
        self.queued_items += items
        self.queued_tokens += tokens
        metrics.queued_items.labels(self.model).set(self.queued_items)

    def seed_rate(self, tokens_per_second: float | None) -> None:
        """The model service's own measure of its rate (its start-up timing of a batched call), until a call of
        this queue teaches one: so even the first burst after a start is bounded by time, not by count alone."""
        if self.tokens_per_second is None and tokens_per_second and tokens_per_second > 0:
            self.tokens_per_second = float(tokens_per_second)

    def _learn_rate(self, tokens: int, seconds: float, saturated: bool) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        rate = tokens / seconds
        self._any_call_rate = max(rate, self._any_call_rate or 0.0)
        if self.tokens_per_second is None:
            # Only a full call sets the first rate: a lone small call runs several times slower per token, and
            # a rate learned from one refused while capacity sat idle.
            if saturated:
                self.tokens_per_second = rate
        elif saturated:
            self.tokens_per_second = max(rate, 0.9 * self.tokens_per_second)
        else:
            self.tokens_per_second = max(rate, self.tokens_per_second)

    def _learn_lag(self, expected: float, waited: float) -> None:
        """How much longer than expected a request really stayed queued (until its call began): up quickly (so a
        flood that slows the event loop tightens admission within a few answers), down slowly (the promise is
        about the slow side), never below 1 (the rate is the recent best). Waits too short to say anything are
        skipped."""
        if expected < MIN_MEASURED_WAIT:
            return
        lag, ratio = self.lag, min(max(waited / expected, 1.0), MAX_LAG)
        self._lag = lag + (0.3 if ratio > lag else 0.02) * (ratio - lag)
        self._lag_at = time.perf_counter()

    def _observe(self, jobs: list[_Job], seqs: list[list[int]]) -> None:
        now = time.perf_counter()
        wait = metrics.queue_wait_seconds.labels(self.model)
        for job in jobs:
            wait.observe(now - job.queued_at)
        metrics.batch_items.labels(self.model).observe(len(seqs))
        metrics.batch_tokens.labels(self.model).observe(sum(map(len, seqs)))


def _held(trace: tracing.RequestTrace | None) -> float:
    """Seconds the request waited unread on its connection after a 503 (its trace's `held` stage)."""
    return trace.stages.get("held", 0.0) if trace is not None else 0.0

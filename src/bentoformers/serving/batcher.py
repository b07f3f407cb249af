"""Gateway-side batching: concurrent requests become one call to the model service.

While a call is in flight, new requests queue; when it returns, everything queued (up to the item and
token budgets) goes in the next call. A lone request therefore goes straight through, and under load
the batches grow by themselves. One call in flight per gateway worker also keeps BentoML's adaptive
batcher in the model service from learning to wait for company. The queue is bounded: beyond it
requests are refused at once with 503 and Retry-After instead of waiting without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from bentoformers.errors import ApiError, ErrorType
from bentoformers.observability import metrics

ModelCall = Callable[[list[list[int]]], Awaitable[np.ndarray]]


@dataclass
class _Job:
    seqs: list[list[int]]
    future: asyncio.Future[np.ndarray]
    queued_at: float


class Coalescer:
    def __init__(
        self,
        call: ModelCall,
        *,
        max_items: int,
        max_tokens: int,
        max_queued: int,
        retry_after: int,
        model: str = "default",
    ) -> None:
        self._call = call
        self.model = model  # the metrics label
        self.max_items, self.max_tokens, self.max_queued = max_items, max_tokens, max_queued
        self.retry_after = retry_after
        self._pending: deque[_Job] = deque()
        self.queued_items = 0
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, seqs: list[list[int]]) -> np.ndarray:
        if self.queued_items and self.queued_items + len(seqs) > self.max_queued:
            metrics.count_rejection("queue_full")
            raise ApiError(
                ErrorType.OVERLOADED,
                f"the server is at capacity ({self.queued_items} texts queued); retry after {self.retry_after}s",
                headers={"Retry-After": str(self.retry_after)},
            )
        job = _Job(seqs, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.append(job)
        self._queued(len(seqs))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await job.future

    async def _drain(self) -> None:
        while self._pending:
            jobs = self._take()
            if not jobs:
                continue
            seqs = [seq for job in jobs for seq in job.seqs]
            self._observe(jobs, seqs)
            try:
                rows = await self._call(seqs)
            except Exception as exc:  # every waiter gets the failure; the drainer goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                end = start + len(job.seqs)
                if not job.future.done():
                    job.future.set_result(rows[start:end])
                start = end

    def _take(self) -> list[_Job]:
        """Whole requests in arrival order, within the budgets (the first one always fits)."""
        jobs: list[_Job] = []
        items = tokens = 0
        while self._pending:
            job = self._pending[0]
            job_tokens = sum(len(s) for s in job.seqs)
            if jobs and (items + len(job.seqs) > self.max_items or tokens + job_tokens > self.max_tokens):
                break
            self._pending.popleft()
            self._queued(-len(job.seqs))
            if job.future.done():  # the client went away while it waited
                continue
            jobs.append(job)
            items += len(job.seqs)
            tokens += job_tokens
        return jobs

    def _queued(self, delta: int) -> None:
        self.queued_items += delta
        metrics.queued_items.labels(self.model).set(self.queued_items)

    def _observe(self, jobs: list[_Job], seqs: list[list[int]]) -> None:
        now = time.perf_counter()
        wait = metrics.queue_wait_seconds.labels(self.model)
        for job in jobs:
            wait.observe(now - job.queued_at)
        metrics.batch_items.labels(self.model).observe(len(seqs))
        metrics.batch_tokens.labels(self.model).observe(sum(map(len, seqs)))

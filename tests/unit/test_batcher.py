import asyncio
import time

import numpy as np
import pytest

from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.queue import LAG_HALF_LIFE, Coalescer
from bentoformers.observability import tracing


class RecordingModel:
    """Stands in for the model service: returns each sequence's token sum, remembers its calls."""

    def __init__(self, delay: float = 0.01, fail: bool = False) -> None:
        self.calls: list[list[list[int]]] = []
        self.delay, self.fail = delay, fail

    async def __call__(self, seqs: list[list[int]]) -> np.ndarray:
        self.calls.append(seqs)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("model service down")
        return np.array([[sum(s)] for s in seqs], dtype=np.float32)


def coalescer(model, **kw):
    args = {"max_items": 64, "max_tokens": 10_000, "max_queued": 100, "retry_after": 2} | kw
    return Coalescer(model, **args)


def test_lone_request_goes_straight_through():
    async def main():
        model = RecordingModel()
        c = coalescer(model)
        out = await asyncio.wait_for(c.submit([[1, 2], [3]]), 1)
        assert out.tolist() == [[3.0], [3.0]]
        assert model.calls == [[[1, 2], [3]]]

    asyncio.run(main())


def test_requests_arriving_while_busy_share_the_next_call_and_get_their_own_rows():
    async def main():
        model = RecordingModel(delay=0.05)
        c = coalescer(model)
        first = asyncio.create_task(c.submit([[1]]))
        await asyncio.sleep(0.01)  # the first call is now in flight
        rest = [asyncio.create_task(c.submit([[i, i], [i]])) for i in range(2, 6)]
        results = await asyncio.gather(first, *rest)
        assert len(model.calls) == 2
        assert len(model.calls[1]) == 8
        assert results[0].tolist() == [[1.0]]
        for i, r in zip(range(2, 6), results[1:]):
            assert r.tolist() == [[2.0 * i], [float(i)]]

    asyncio.run(main())


def test_budgets_split_calls_but_never_split_a_request():
    async def main():
        model = RecordingModel(delay=0.02)
        c = coalescer(model, max_items=3)
        tasks = [asyncio.create_task(c.submit([[1], [2]])) for _ in range(3)]
        await asyncio.gather(*tasks)
        assert [len(call) for call in model.calls] == [2, 2, 2]

    asyncio.run(main())


def test_full_queue_is_refused_at_once_with_retry_after():
    async def main():
        model = RecordingModel(delay=0.1)
        c = coalescer(model, max_queued=4)
        busy = asyncio.create_task(c.submit([[1]]))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(c.submit([[1]] * 4))
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as info:
            await c.submit([[1]])
        assert info.value.kind is ErrorType.OVERLOADED and info.value.status == 503
        assert info.value.headers["Retry-After"] == "2"
        await asyncio.gather(busy, queued)

    asyncio.run(main())


def test_the_queue_is_sized_by_time_at_the_models_recent_rate():
    async def main():
        model = RecordingModel(delay=0.1)
        c = coalescer(model, max_wait=1.0, max_tokens=10)
        await c.submit([[1] * 10])  # a lone call that the budget did not cut: it teaches nothing
        assert c.tokens_per_second is None
        busy = asyncio.create_task(c.submit([[1] * 10]))
        await asyncio.sleep(0.01)
        # Two of 10 tokens queued behind it: the budget cuts the next call, so it runs at the batched rate:
        # 10 tokens in ~0.1 s, ~100 tokens/s (a little less: the loop's own time).
        await asyncio.gather(busy, c.submit([[1] * 10]), c.submit([[1] * 10]))
        assert 60 < c.tokens_per_second <= 100
        busy = asyncio.create_task(c.submit([[1] * 10]))
        await asyncio.sleep(0.01)
        first = asyncio.create_task(c.submit([[1] * 40]))  # the first in the queue always waits its turn
        await asyncio.sleep(0)
        started = time.perf_counter()
        with pytest.raises(ApiError) as info:
            await c.submit([[1] * 80])  # 120 tokens queued: over a second of work
        assert time.perf_counter() - started < 0.5  # at once, not after the second of queued work
        assert info.value.status == 503 and "s of work" in info.value.message
        fits = asyncio.create_task(c.submit([[1] * 20]))  # 60 tokens queued: about 0.6 s
        await asyncio.gather(busy, first, fits)
        assert c.queued_items == c.queued_tokens == 0

    asyncio.run(main())


def test_a_failed_call_fails_its_waiters_and_the_next_call_still_runs():
    async def main():
        model = RecordingModel(fail=True)
        c = coalescer(model)
        with pytest.raises(ConnectionError):
            await c.submit([[1]])
        model.fail = False
        assert (await c.submit([[2]])).tolist() == [[2.0]]

    asyncio.run(main())


def test_cancelled_waiters_are_dropped_before_the_call():
    async def main():
        model = RecordingModel(delay=0.05)
        c = coalescer(model)
        busy = asyncio.create_task(c.submit([[1]]))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(c.submit([[7]]))
        kept = asyncio.create_task(c.submit([[8]]))
        await asyncio.sleep(0)
        gone.cancel()
        await busy
        assert (await kept).tolist() == [[8.0]]
        assert [[7]] not in model.calls[1:] and model.calls[1] == [[8]]

    asyncio.run(main())


def test_a_queue_past_its_time_refuses_before_the_request_is_tokenized():
    async def main():
        model = RecordingModel(delay=0.1)
        c = coalescer(model, max_wait=0.5, max_tokens=10)
        c.check_room(5)  # nothing queued: room
        c.tokens_per_second = 100.0  # as learned from full calls
        busy = asyncio.create_task(c.submit([[1] * 10]))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(c.submit([[1] * 60]))  # 0.6 s of work queued
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as info:
            c.check_room(1)  # any request now, before its tokens are known
        assert info.value.status == 503 and info.value.headers["Retry-After"] == "2"
        await asyncio.gather(busy, queued)
        c.check_room(1)  # drained: room again

    asyncio.run(main())


def test_a_rate_learned_while_slow_is_raised_by_the_next_faster_call():
    # Was: only full calls taught the rate, as an average. One slow full call (the CPU shared for a moment)
    # left a rate a tenth of the model's; its refusals kept the queue too short for another full call, so the
    # rate never mended and a soak of eight clients got 503s for minutes.
    async def main():
        model = RecordingModel(delay=0.1)
        c = coalescer(model, max_wait=1.0, max_tokens=10)
        c.tokens_per_second = 10.0  # as learned from a full call that ran slowly
        busy = asyncio.create_task(c.submit([[1] * 10]))
        await asyncio.sleep(0.01)
        first = asyncio.create_task(c.submit([[1] * 5]))  # the first in the queue always waits its turn
        await asyncio.sleep(0)
        with pytest.raises(ApiError):
            await c.submit([[1] * 20])  # 2.5 s of work at the stale rate
        await asyncio.gather(busy, first)  # calls the budget did not cut, at ~100 and ~50 tokens/s
        assert 60 < c.tokens_per_second <= 100
        busy = asyncio.create_task(c.submit([[1] * 10]))
        await asyncio.sleep(0.01)
        first = asyncio.create_task(c.submit([[1] * 5]))
        await asyncio.sleep(0)
        await asyncio.gather(busy, first, c.submit([[1] * 20]))  # ~0.25 s of work now: admitted

    asyncio.run(main())


def test_a_slow_full_call_lowers_the_rate_by_a_tenth_and_a_lasting_slowdown_is_followed():
    async def main():
        model = RecordingModel(delay=0.5)  # 10 tokens in 0.5 s: 20 tokens/s
        c = coalescer(model, max_tokens=10)
        c.tokens_per_second = 100.0
        rates = []
        for _ in range(3):
            busy = asyncio.create_task(c.submit([[1] * 10]))
            await asyncio.sleep(0.01)
            await asyncio.gather(busy, c.submit([[1] * 10]), c.submit([[1] * 10]))  # the second call is full
            rates.append(c.tokens_per_second)
        assert 85 < rates[0] <= 90  # one slow full call: a tenth less, not the slow call's 20
        assert rates[2] < rates[1] < rates[0]

    asyncio.run(main())


class GatedModel(RecordingModel):
    """A model service call that returns only when the test opens the gate: a call held in flight."""

    def __init__(self) -> None:
        super().__init__(delay=0)
        self.gate = asyncio.Event()

    async def __call__(self, seqs: list[list[int]]) -> np.ndarray:
        await self.gate.wait()
        return await super().__call__(seqs)


def test_the_call_in_flight_counts_in_a_requests_expected_wait():
    # Was: only the queued tokens counted, so a flood behind a long call waited that call on top of max_wait.
    async def main():
        model = GatedModel()
        c = coalescer(model, max_wait=1.0, max_tokens=1000)
        c.tokens_per_second = 1000.0  # as learned from full calls
        in_flight = asyncio.create_task(c.submit([[1] * 900]))  # ~0.9 s of work, in the model service now
        await asyncio.sleep(0.01)
        first = asyncio.create_task(c.submit([[1] * 10]))  # the first in the queue always waits its turn
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as info:  # at once (admitted, it would wait on the gate: a TimeoutError)
            await asyncio.wait_for(c.submit([[1] * 500]), 2)  # ~0.9 s left in flight + 0.01 queued + 0.5 its own
        assert info.value.status == 503 and "Retry-After" in info.value.headers
        fits = asyncio.create_task(c.submit([[1] * 50]))  # ~0.96 s
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(in_flight, first, fits)

    asyncio.run(main())


def test_before_any_rate_is_learned_only_the_count_bounds_the_queue():
    # A cold server's first burst is not refused on a guess of the model's speed (one call's budget refused
    # most of it); the count still bounds it.
    async def main():
        model = GatedModel()
        c = coalescer(model, max_wait=1.0, max_tokens=100, max_queued=25)
        in_flight = asyncio.create_task(c.submit([[1] * 10]))  # the first call ever: no rate yet
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(c.submit([[1] * 10])) for _ in range(25)]  # 250 tokens: past one call
        await asyncio.sleep(0)
        assert c.queued_items == 25
        with pytest.raises(ApiError) as info:
            await asyncio.wait_for(c.submit([[1] * 10]), 2)
        assert info.value.status == 503
        model.gate.set()
        await asyncio.gather(in_flight, *queued)

    asyncio.run(main())


def test_the_check_before_tokenizing_counts_the_texts_at_the_recent_tokens_per_text():
    # Was: before tokenizing a request counted as no tokens, so a big one passed the early check whole.
    async def main():
        model = GatedModel()
        c = coalescer(model, max_wait=1.0, max_tokens=10_000, max_queued=1000)
        c.tokens_per_second = 1000.0
        in_flight = asyncio.create_task(c.submit([[1] * 10] * 10))  # 100 tokens, 10 per text
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(c.submit([[1] * 10] * 50))  # 500 tokens queued: ~0.6 s of work in all
        await asyncio.sleep(0)
        c.check_room(10)  # ~0.1 s more: room
        with pytest.raises(ApiError):
            c.check_room(64)  # ~0.64 s more, before its tokens are known
        model.gate.set()
        await asyncio.gather(in_flight, queued)

    asyncio.run(main())


def test_a_seeded_rate_bounds_the_first_burst_by_time():
    # The model service's start-up timing seeds the rate (gateway/endpoint.py, from its describe): without it a
    # cold server's first burst was bounded by count alone and waited far past max_wait.
    async def main():
        model = GatedModel()
        c = coalescer(model, max_wait=1.0, max_tokens=1000, max_queued=10_000)
        c.seed_rate(100.0)  # 100 tokens a second: 1 s holds about 100 queued tokens
        in_flight = asyncio.create_task(c.submit([[1] * 10]))
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(c.submit([[1] * 10])) for _ in range(8)]
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as info:
            await asyncio.wait_for(c.submit([[1] * 10] * 5), 2)
        assert info.value.status == 503
        c.seed_rate(1e9)  # a seed never replaces a rate already held
        assert c.tokens_per_second == 100.0
        model.gate.set()
        await asyncio.gather(in_flight, *queued)

    asyncio.run(main())


def test_a_request_whose_time_is_up_in_the_queue_is_answered_503_not_run():
    # The promise is kept at the queue's end too: whatever the estimate said at admission, a request that would be
    # answered past max_wait is refused with Retry-After when its turn comes, and the model never runs it.
    async def main():
        model = RecordingModel(delay=0.2)
        c = coalescer(model, max_items=1, max_wait=0.5)  # no rate yet: admission bounds by count only
        first = asyncio.create_task(c.submit([[1]]))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        queued = [asyncio.create_task(c.submit([[k]])) for k in (2, 3, 4, 5)]
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        answered = [r for r in results[1:] if not isinstance(r, BaseException)]
        refused = [r for r in results[1:] if isinstance(r, ApiError)]
        assert len(answered) == 1 and answered[0].tolist() == [[2.0]]  # waited 0.19 s: its call ends within 0.5 s
        assert len(refused) == 3 and all(r.status == 503 and r.headers["Retry-After"] == "2" for r in refused)
        assert "waited" in refused[0].message
        assert [call[0][0] for call in model.calls] == [1, 2]  # the late ones never reached the model
        assert time.perf_counter() - started < 0.7
        assert (await c.submit([[6]])).tolist() == [[6.0]]  # and the queue goes on

    asyncio.run(main())


def test_a_request_held_unread_after_a_503_has_that_much_less_time_in_the_queue():
    # The promise is the client's: a request that waited 0.3 s unread on its connection after a 503 (its
    # trace's `held` stage says so) was sent 0.3 s before it was queued.
    async def main():
        model = RecordingModel(delay=0.2)
        c = coalescer(model, max_items=1, max_wait=0.5)

        async def begun(ago: float, k: int):
            trace = tracing.RequestTrace()
            if ago:
                trace.add("held", ago)
            tracing.begin(trace)
            return await c.submit([[k]])

        first = asyncio.create_task(c.submit([[1]]))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, begun(0.0, 2))  # it waited 0.19 s: run
        first = asyncio.create_task(c.submit([[1]]))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(begun(0.3, 3))  # 0.3 s held + 0.19 s queued: past the 0.25 s at least allowed
        with pytest.raises(ApiError) as refused:
            await late
        await first
        assert refused.value.status == 503 and "has waited 0.5s" in refused.value.message
        assert [call[0][0] for call in model.calls] == [1, 2, 1]  # it never reached the model
        c.queued_items = 1  # something queued: admission compares the expected wait plus the hold with max_wait
        with pytest.raises(ApiError):
            await begun(0.6, 4)

    asyncio.run(main())


def test_the_expected_wait_grows_by_the_measured_lag_of_real_waits():
    # A rate that promises more than the server delivers (here a seed 5x too high; under a flood it is the event
    # loop's own lag) is corrected by how long the answered requests really stayed queued.
    async def main():
        model = RecordingModel(delay=0.1)
        c = coalescer(model, max_items=1, max_tokens=10_000)
        c.seed_rate(50_000.0)  # 1,000 tokens in 0.02 s; the model takes 0.1 s
        first = asyncio.create_task(c.submit([[1] * 1000]))
        await asyncio.sleep(0.001)
        await asyncio.gather(first, *(c.submit([[1] * 1000]) for _ in range(5)))
        assert c.lag > 2.0
        c.queued_tokens = 5000  # as if that much were queued: it counts at the lag, the request's own tokens do not
        assert c.expected_wait(1000) == pytest.approx((5000 * c.lag + 1000) / c.tokens_per_second, rel=1e-3)
        learned = c.lag
        c._lag_at -= LAG_HALF_LIFE  # half a minute with no wait to measure it: half way back to 1
        assert c.lag == pytest.approx(1 + (learned - 1) / 2, rel=1e-3)

    asyncio.run(main())


def test_one_call_longer_than_the_promise_does_not_refuse_everything_after_it():
    async def main():
        model = RecordingModel(delay=0.4)
        c = coalescer(model, max_wait=0.3)
        await c.submit([[1]])  # took longer than max_wait
        model.delay = 0.01
        assert (await asyncio.wait_for(c.submit([[2]]), 1)).tolist() == [[2.0]]

    asyncio.run(main())

import numpy as np
import pytest

from bentoformers.runtime.decoder import DecodeBatch
from bentoformers.runtime.generation import Sampling, sample


def test_greedy_and_the_limits_of_sampling():
    logits = np.array([0.1, 3.0, 2.9, -1.0, 2.8], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, Sampling(), rng) == 1
    assert sample(logits, Sampling(temperature=1.0, top_k=1), rng) == 1
    assert sample(logits, Sampling(temperature=1.0, top_p=1e-6), rng) == 1
    drawn = {sample(logits, Sampling(temperature=5.0, top_k=3), rng) for _ in range(400)}
    assert drawn == {1, 2, 4}  # only the three best, and all of them at a high temperature
    # top_p keeps the smallest set whose mass reaches p: here the two best (about 0.53 of the mass)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert probs[1] < 0.5 < probs[1] + probs[2]
    assert {sample(logits, Sampling(temperature=1.0, top_p=0.5), rng) for _ in range(200)} == {1, 2}


def test_a_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(1).normal(size=50).astype(np.float32)
    draws = [[sample(logits, Sampling(temperature=1.0), np.random.default_rng(7)) for _ in range(3)] for _ in range(2)]
    assert draws[0] == draws[1]


def _batch(lengths, fill):
    past = [np.zeros((len(lengths), 2, max(lengths), 4), np.float32) for _ in range(2)]
    mask = np.zeros((len(lengths), max(lengths)), np.int64)
    for row, n in enumerate(lengths):
        mask[row, max(lengths) - n :] = 1
        for p in past:
            p[row, :, max(lengths) - n :] = fill + row
    return DecodeBatch(past, mask, np.array(lengths))


def test_joining_left_pads_to_one_length_and_masks_the_padding():
    joined = DecodeBatch.join(_batch([3], 10), _batch([5, 2], 20))
    assert joined.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert joined.positions.tolist() == [3, 5, 2]
    assert (joined.past[0][0, :, 2:] == 10).all() and (joined.past[0][0, :, :2] == 0).all()
    assert (joined.past[1][2, :, 3:] == 21).all()


def test_keeping_rows_drops_the_columns_nobody_uses_any_more():
    joined = DecodeBatch.join(_batch([3], 10), _batch([5, 2], 20))
    kept = joined.keep([0, 2])  # the long sequence left
    assert kept.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert kept.past[0].shape == (2, 2, 3, 4) and kept.positions.tolist() == [3, 2]


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-30, 1e-7, 2.0])
def test_sampling_is_total_for_every_temperature_in_range(temperature):
    # 1e-308 once overflowed logits / temperature, the probabilities became NaN, and sampling raised.
    logits = np.array([0.5, 3.0, 2.9, -1e30, 1e30 / 3, -2.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        token = sample(logits, Sampling(temperature=temperature, top_p=0.9, top_k=3), rng)
        assert 0 <= token < len(logits)
    if temperature < 1e-6:  # so cold that it is greedy
        assert sample(logits, Sampling(temperature=temperature), rng) == 4


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_logits_fall_back_to_the_most_likely_finite_token(bad):
    logits = np.array([0.1, 3.0, bad, 2.0], dtype=np.float32)
    for sampling in (Sampling(), Sampling(temperature=1.0), Sampling(temperature=0.7, top_p=0.5, top_k=2)):
        assert sample(logits, sampling, np.random.default_rng(0)) == 1
    for every in (np.nan, -np.inf):
        assert sample(np.full(4, every, dtype=np.float32), Sampling(temperature=1.0), np.random.default_rng(0)) == 0


def test_a_minus_infinite_logit_is_never_drawn():
    logits = np.array([0.0, -np.inf, 0.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert {sample(logits, Sampling(temperature=1.0), rng) for _ in range(100)} == {0, 2}

import numpy as np

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

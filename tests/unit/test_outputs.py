"""runtime/outputs.py, the gateway's output types, against sentence-transformers' quantize_embeddings with the
same ranges: equal bit for bit, and a row's output does not depend on the rows beside it."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from bentoformers.runtime.outputs import b64_f32le, calibrate, quantize, ranges_of


@pytest.mark.parametrize("dim", [32, 13])  # 13: the last byte of a binary row zero-padded
@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_quantize_is_sentence_transformers_with_stored_ranges(kind, dim):
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((200, dim)).astype(np.float32)
    rows = rng.standard_normal((50, dim)).astype(np.float32) * 1.5  # some beyond the calibrated range: clipped
    ranges = ranges_of(calibrate(calibration, False, [dim]), dim)
    ours = quantize(rows, kind, ranges)
    np.testing.assert_array_equal(ours, quantize_embeddings(rows, kind, ranges=ranges))
    assert ours.dtype == np.int8 if kind in ("int8", "binary") else ours.dtype == np.uint8
    alone = np.concatenate([quantize(rows[i:i + 1], kind, ranges) for i in range(len(rows))])
    np.testing.assert_array_equal(alone, ours)


def test_calibrated_ranges_survive_json_and_a_cut_size_is_normalised():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((100, 16)).astype(np.float32)
    stored = calibrate(rows, False, [16, 8])
    full, cut = ranges_of(stored, 16), ranges_of(stored, 8)
    np.testing.assert_array_equal(full, np.stack([rows.min(0), rows.max(0)]))
    unit = rows[:, :8] / np.linalg.norm(rows[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, np.stack([unit.min(0), unit.max(0)]), atol=1e-6)
    assert cut.max() <= 1.0


def test_base64_is_little_endian_float32():
    rows = np.array([[0.1, -0.2, 3.0]], dtype=np.float32)
    (encoded,) = b64_f32le(rows)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), "<f4"), rows[0])

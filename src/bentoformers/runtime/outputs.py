"""The output types of an embedding, from the float32 rows the gateway returns as `float`: base64 of the
float32 bytes, and the quantized types exactly as sentence-transformers' `quantize_embeddings` computes them
(sentence_transformers/util/quantization.py) with ranges passed in. The ranges are always the stored ones,
calibrated at build: never taken from the batch, so a text's output does not depend on its neighbours.
numpy only (sentence-transformers is a build dependency)."""

from __future__ import annotations

import base64

import numpy as np

QUANTIZED = ("int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # the types that need ranges; binary/ubinary are the sign bits


def b64_f32le(rows: np.ndarray) -> list[str]:
    """base64 of each row's little-endian float32 values (as OpenAI's and vLLM's base64)."""
    return [base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode() for row in rows]


def quantize(rows: np.ndarray, kind: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """int8/uint8 with `ranges` (shape (2, dim): per dimension its min and max, float32), or binary/ubinary."""
    rows = np.asarray(rows, dtype=np.float32)
    if kind in ("binary", "ubinary"):
        packed = np.packbits(rows > 0, axis=-1)  # the first dimension is the high bit
        return packed if kind == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    starts = ranges[0]
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps).astype(ranges.dtype)
    levels = np.clip(np.floor((rows - starts) / steps), 0, 255)
    return levels.astype(np.uint8) if kind == "uint8" else (levels - 128).astype(np.int8)


def dequantize(values: np.ndarray, kind: str, ranges: np.ndarray) -> np.ndarray:
    """The middle of each int8/uint8 value's step: what a search over the stored integers approximates."""
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    levels = values.astype(np.float32) + (128 if kind == "int8" else 0)
    return ranges[0] + (levels + 0.5) * steps


def served(rows: np.ndarray, normalize: bool, size: int) -> np.ndarray:
    """The float32 vectors a request gets at `size` (api/embeddings.py _embed with normalize absent): the full
    size as the model normalises, a Matryoshka size cut and L2-normalised."""
    from bentoformers.runtime.encoder import l2_normalize

    rows = np.asarray(rows, dtype=np.float32)
    if size < rows.shape[1]:
        return l2_normalize(np.ascontiguousarray(rows[:, :size])).astype(np.float32)
    return l2_normalize(rows).astype(np.float32) if normalize else rows


def calibrate(rows: np.ndarray, normalize: bool, sizes: list[int]) -> dict[str, list[list[float]]]:
    """Per servable size, the per-dimension min and max of the calibration vectors (float32 values)."""
    ranges = {}
    for size in sizes:
        vectors = served(rows, normalize, size)
        ranges[str(size)] = np.stack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32).tolist()
    return ranges


def ranges_of(stored: dict[str, list[list[float]]], size: int) -> np.ndarray:
    return np.asarray(stored[str(size)], dtype=np.float32)

"""Fidelity of a built variant against the fp32 PyTorch reference, and the shipped sentences it is measured on."""

from __future__ import annotations

from importlib import resources

import numpy as np

from .engine import l2_normalize


def shipped_sentences() -> list[str]:
    text = resources.files("bentoformers").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def compare(candidate: np.ndarray, reference: np.ndarray, k: int = 10) -> dict[str, float]:
    """Cosine per text (min, mean) and how many of each text's k nearest neighbours are kept."""
    a, b = l2_normalize(candidate.astype(np.float64)), l2_normalize(reference.astype(np.float64))
    cosine = (a * b).sum(axis=1)
    k = min(k, len(a) - 1)
    overlap = 1.0
    if k > 0:
        overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(_neighbours(a, k), _neighbours(b, k))]))
    return {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()), "neighbour_overlap": overlap}


def _neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1)[:, :k]

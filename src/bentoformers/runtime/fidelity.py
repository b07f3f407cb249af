"""Fidelity of a built variant against the fp32 PyTorch reference, and the shipped sentences it is measured on."""

from __future__ import annotations

from importlib import resources

import numpy as np

from bentoformers.runtime.encoder import l2_normalize


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


def generation_prompts(count: int = 8, words: int = 6) -> list[str]:
    """Fixed prompts for the greedy check: the opening words of the first shipped sentences."""
    return [" ".join(s.split()[:words]) for s in shipped_sentences()[:count]]


def compare_scores(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-label agreement and the largest difference of any label's probability."""
    agreement = float(np.mean(candidate.argmax(axis=1) == reference.argmax(axis=1)))
    return {"label_agreement": agreement, "max_prob_diff": float(np.abs(candidate - reference).max())}


def compare_greedy(candidate: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Share of the reference's greedy tokens reproduced, each prompt counted up to its first divergence
    (after it the two continue from different text, so later tokens say nothing)."""
    agreed = total = 0
    for ours, theirs in zip(candidate, reference):
        total += len(theirs)
        for a, b in zip(ours, theirs):
            if a != b:
                break
            agreed += 1
    return {"token_agreement": agreed / max(total, 1)}

"""Fidelity of a built variant against the fp32 PyTorch reference, the shipped sentences it is measured on, and
the gates it is held to."""

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


def rerank_sets(queries: int = 24, documents: int = 8) -> list[tuple[str, list[str]]]:
    """Fixed query/document sets for the ranking check: each query is the opening words of one of its
    documents, which are consecutive shipped sentences (mixed topics and lengths)."""
    sentences = shipped_sentences()
    sets = []
    for q in range(queries):
        docs = sentences[q * documents : (q + 1) * documents]
        sets.append((" ".join(docs[q % documents].split()[:5]), docs))
    return sets


NLI_HYPOTHESES = ("about travel", "about technology", "about food", "a complaint", "a question", "good news")


def nli_pairs() -> list[tuple[str, str]]:
    """Premise/hypothesis pairs for an NLI model's check: each shipped sentence with a zero-shot hypothesis."""
    return [(s, f"This example is {NLI_HYPOTHESES[i % len(NLI_HYPOTHESES)]}.") for i, s in enumerate(shipped_sentences())]


def compare_ranking(candidate: np.ndarray, reference: np.ndarray, groups: list[int]) -> dict[str, float]:
    """Per query (consecutive `groups` of scores): the same top document, Kendall's tau between the two
    orders (tau-a: ties count as disagreement), and the largest score difference."""
    top1, taus, start = [], [], 0
    for size in groups:
        a, b = candidate[start : start + size], reference[start : start + size]
        start += size
        top1.append(float(a.argmax() == b.argmax()))
        i, j = np.triu_indices(size, k=1)
        taus.append(float(np.mean(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]))) if size > 1 else 1.0)
    return {
        "top1_agreement": float(np.mean(top1)),
        "kendall_tau": float(np.mean(taus)),
        "max_score_diff": float(np.abs(candidate - reference).max()),
    }


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


# Figures that must stay at or below their gate; every other figure must reach it.
UPPER_BOUNDS = frozenset({"max_prob_diff", "max_score_diff"})


def gate_failures(figures: dict[str, float], gates: dict[str, float]) -> list[str]:
    failed = []
    for name, bound in gates.items():
        value = figures[name]
        if (value > bound) if name in UPPER_BOUNDS else (value < bound):
            failed.append(f"{name} {value:.5f} {'>' if name in UPPER_BOUNDS else '<'} {bound}")
    return failed

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
UPPER_BOUNDS = frozenset({"max_prob_diff", "max_score_diff", "max_weight_diff"})


def gate_failures(figures: dict[str, float], gates: dict[str, float]) -> list[str]:
    failed = []
    for name, bound in gates.items():
        value = figures[name]
        if (value > bound) if name in UPPER_BOUNDS else (value < bound):
            failed.append(f"{name} {value:.5f} {'>' if name in UPPER_BOUNDS else '<'} {bound}")
    return failed


def quantized_retrieval(
    queries: np.ndarray, documents: np.ndarray, ref_queries: np.ndarray, ref_documents: np.ndarray, kind: str,
    ranges: np.ndarray | None, k: int = 10, rescore: int = 40,
) -> dict[str, float]:
    """How well a quantized output type retrieves, against float: per query, the overlap of its top k documents
    with the top k of the fp32 reference's float vectors. int8/uint8: the dequantized vectors (query and document
    quantized), and for information the raw integer dot product; binary/ubinary: the top `rescore` by Hamming
    distance, rescored with the float query and document vectors (of the candidate)."""
    from bentoformers.runtime.outputs import dequantize, quantize

    truth = _top(ref_queries @ ref_documents.T, k)
    q, d = quantize(queries, kind, ranges), quantize(documents, kind, ranges)
    if kind in ("int8", "uint8"):
        deq_q, deq_d = dequantize(q, kind, ranges), dequantize(d, kind, ranges)
        raw = q.astype(np.int64) @ d.astype(np.int64).T
        return {"recall_at_10": _overlap(_top(deq_q @ deq_d.T, k), truth),
                "raw_ip_recall_at_10": _overlap(_top(raw.astype(np.float64), k), truth)}
    qb, db = np.unpackbits(q.view(np.uint8), axis=1), np.unpackbits(d.view(np.uint8), axis=1)
    hamming = (qb[:, None, :] != db[None, :, :]).sum(axis=2)
    candidates = np.argsort(hamming, axis=1, kind="stable")[:, :rescore]
    scores = np.einsum("qd,qcd->qc", queries, documents[candidates])
    rescored = np.take_along_axis(candidates, np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
    return {"rescored_recall_at_10": _overlap(rescored, truth),
            "hamming_recall_at_10": _overlap(_top(-hamming.astype(np.float64), k), truth)}


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def compare_sparse(candidate: np.ndarray, reference: np.ndarray, k: int = 32, neighbours: int = 10) -> dict[str, float]:
    """SPLADE weights (a row per text, a column per term) against the reference: the largest weight difference,
    the overlap of each text's top k terms, and (with `neighbours`) how many of each text's top documents by
    dot product are kept, every text a query against the others. A reference may hold only some of each row's
    weights (NaN elsewhere, the start-up check set): the figures then use only those."""
    known = ~np.isnan(reference)
    diff = float(np.abs(np.where(known, candidate - np.nan_to_num(reference), 0)).max())
    ranked = np.where(known, reference, -np.inf)
    truth = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    found = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    figures = {"max_weight_diff": diff, "top_terms_overlap": _overlap(found, truth)}
    if neighbours and known.all():
        a, b = candidate @ candidate.T, reference @ reference.T
        np.fill_diagonal(a, -np.inf)
        np.fill_diagonal(b, -np.inf)
        figures["dot_recall_at_10"] = _overlap(_top(a, neighbours), _top(b, neighbours))
    return figures

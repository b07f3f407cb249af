"""SPLADE (`sparse-embeddings`) built from the tiny masked LM of served_build (a BertForMaskedLM made from a
config with MiniLM's tokenizer): the served fp32 graph against sentence-transformers' SparseEncoder on the same
checkpoint, per weight; a text alone and in a batch; the int8 variant saved at its gate or refused below it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bentoformers.build.export import reference_sparse
from bentoformers.runtime.encoder import OnnxEncoder
from bentoformers.runtime.fidelity import compare_sparse, shipped_sentences
from bentoformers.runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def splade(served_build, checkpoints):
    import bentoml

    results = served_build["splade"]
    return {p: Path(bentoml.models.get(r.tag).path) for p, r in results.items() if r.ok}, results


def test_fp32_is_sparse_encoders_splade_within_1e_5_per_weight(splade, checkpoints):
    folders, results = splade
    texts = shipped_sentences()[::5]
    encoder = OnnxEncoder(folders["fp32"])
    ids = TextTokenizer(folders["fp32"], encoder.card.max_length).encode(texts, truncate=True)
    rows = encoder.embed(ids)
    reference = reference_sparse(checkpoints / "splade", texts, encoder.card.max_length)
    assert rows.shape == reference.shape == (len(texts), 30522)
    print("splade fp32 max |weight - SparseEncoder|:", float(np.abs(rows - reference).max()))
    np.testing.assert_allclose(rows, reference, atol=1e-5, rtol=0)
    # The build's own figures, on all the shipped sentences, say the same.
    assert results["fp32"].figures["max_weight_diff"] <= 1e-5
    assert results["fp32"].figures["top_terms_overlap"] >= 0.999
    alone = np.concatenate([encoder.embed([seq]) for seq in ids[:12]])
    np.testing.assert_array_equal(alone, rows[:12])


def test_int8_is_saved_at_its_gate_or_refused_below_it(splade):
    folders, results = splade
    int8 = results["int8"]
    print("splade int8:", int8.status, int8.figures or int8.reason)
    if int8.ok:
        assert int8.figures["top_terms_overlap"] >= 0.95 and int8.figures["dot_recall_at_10"] >= 0.95
        assert "int8" in folders
    else:
        assert "below its gate on " in int8.reason, int8.reason


def test_compare_sparse_reads_a_partial_reference():
    rng = np.random.default_rng(0)
    reference = np.maximum(rng.standard_normal((4, 100)), 0).astype(np.float32)
    candidate = reference.copy()
    candidate[:, 0] += 0.25
    partial = np.full_like(reference, np.nan)
    top = np.argsort(-reference, axis=1)[:, :40]
    np.put_along_axis(partial, top, np.take_along_axis(reference, top, axis=1), axis=1)
    full, part = compare_sparse(candidate, reference), compare_sparse(candidate, partial, neighbours=0)
    assert full["max_weight_diff"] == pytest.approx(0.25) and full["dot_recall_at_10"] <= 1
    assert part["top_terms_overlap"] == full["top_terms_overlap"] and "dot_recall_at_10" not in part

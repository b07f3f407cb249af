"""The encoder int8 graph's shape: its products run in ONNX Runtime's fused integer kernel (build/quantize.py)."""

from __future__ import annotations

from collections import Counter

import onnx

from bentoformers.runtime.card import ONNX_FILE


def test_each_quantized_product_is_one_fused_kernel_with_no_clip_before_it(minilm_path):
    ops = Counter(n.op_type for n in onnx.load(str(minilm_path["int8"] / ONNX_FILE)).graph.node)
    # MiniLM: 6 layers x (query/key/value as one product, attention output, two feed-forward products)
    assert ops["MatMulIntegerToFloat"] == 6 * 4
    assert ops["MatMulInteger"] == 0 and ops["Clip"] == 0

"""int8 graphs that compute the same on every x86-64 CPU: encoders (per-token W7A8) and decoders (weight-only).

ONNX Runtime's dynamic int8 quantizes each MatMul's activations with one scale per tensor and 8-bit
weights. That loses fidelity (one outlier sets the scale of every token in the batch, so a text's
embedding also depends on its batch), and on AVX2 without VNNI its u8 x s8 products are summed in
saturating 16-bit pairs (VPMADDUBSW), so the same graph answers differently there than on a VNNI CPU.

`quantize_encoder_int8` rewrites every MatMul with a weight instead:
- activations: one scale per token (row), symmetric, stored as u8 with zero point 128;
- weights: one scale per output channel, **7-bit** (|w| <= 63): 255 * 63 * 2 < 2**15, so no pair sum
  saturates on any instruction set and the integer products are exact everywhere;
- SmoothQuant (alpha 0.5) moves activation range into the weights per input channel, calibrated on
  the given token ids; the few input channels with the largest range left ("outliers", 1 in 96) stay
  in fp32, LLM.int8()-style.
Each row is quantized on its own, so the rewritten graph stays row-independent. Inputs shared by
several MatMuls (attention's query, key and value) are quantized once.

Speed: on a Zen 4 (AVX-512 VNNI, no AMX) the integer products were only a quarter of the int8 graph's time;
the element-wise passes around them (quantizing each row, scaling the result back) took about as much as
the products and left int8 barely faster than fp32 at one text per call. Those passes are paid per token, so
fewer passes over each row is what pays:
- the product, its cast and its per-column scale are one ONNX Runtime kernel (MatMulIntegerToFloat, the same
  u8 x s8 integer GEMM);
- each row is quantized by one QuantizeLinear (opset 21's blocked form, one block per row: divide, round half
  to even, shift by 128, saturate) instead of five element-wise passes; its zero points must have the
  scale's shape, so every product shares one tensor of 128s made from the input ids' shape (a product whose
  rows are not the tokens, such as a pooler's, stays fp32);
- the graph rewritten is ONNX Runtime's optimised one (GELU with its bias and the layer norms fused, the
  export's shape arithmetic cleaned up: build/export.py optimize(for_int8=True)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bentoformers.build.export import POOLING_PREFIX
from bentoformers.tasks import TASKS

ENCODER_SCHEME = (
    "per-token W7A8 (7-bit weights per channel, 8-bit activations per token), SmoothQuant 0.5, 1/96 outlier channels "
    "fp32, fused MatMulIntegerToFloat, rows quantized by blocked QuantizeLinear on the optimised graph"
)
DECODER_SCHEME = "weight-only int8 (MatMulNBits, block 32, int8 compute per row block)"


def int8_scheme(task: str) -> str:
    """What a task's int8 variant is, for the model card and the store version."""
    return DECODER_SCHEME if TASKS[task].decoder else ENCODER_SCHEME


WEIGHT_LEVELS = 63  # 7-bit weights: see the module docstring
ACTIVATION_LEVELS = 127
SMOOTHING_ALPHA = 0.5
OUTLIER_SHARE = 96  # one input channel in this many (at least one) stays in fp32
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulIntegerToFloat)
BLOCKED_QUANTIZE_OPSET = 21  # QuantizeLinear's block_size
TOKEN_ZERO_POINT = "q_token_zero_point"  # 128 per token (batch, tokens, 1): the zero points of every per-token product


def quantize_encoder_int8(onnx_path: Path, out_path: Path, calibration: list[list[int]]) -> Path:
    """Per-token W7A8 int8 (see the module docstring), calibrated on token ids run one text at a time."""
    import onnx
    from onnx import numpy_helper

    model = _at_opset(onnx.load(str(onnx_path)), BLOCKED_QUANTIZE_OPSET)
    graph = model.graph
    weights = {w.name: w for w in graph.initializer}
    targets = [
        n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2
        and not n.name.startswith(POOLING_PREFIX)  # the appended pooling stays float
    ]
    consumers: dict[str, list] = {}
    for node in targets:
        consumers.setdefault(node.input[0], []).append(node)
    ranges, per_token = _activation_ranges(model, list(consumers), calibration)
    # a product whose rows are not the tokens (a pooler's, on one vector a text) stays fp32: small, and its
    # per-row zero points would need a shape of their own
    consumers = {source: nodes for source, nodes in consumers.items() if per_token[source]}
    targets = [n for nodes in consumers.values() for n in nodes]
    arrays = {
        "q_tiny": np.array(1e-12, np.float32),
        "q_step": np.array(1 / ACTIVATION_LEVELS, np.float32),
        "q_one": np.array(1.0, np.float32),
        "q_zero_point": np.array(128, np.uint8),
        "q_last_axis": np.array([-1], np.int64),
    }
    inserted: dict[str, list] = {}  # the first consumer's output -> the nodes that replace every consumer
    for index, (source, nodes) in enumerate(consumers.items()):
        mats = [numpy_helper.to_array(weights[n.input[1]]).astype(np.float64) for n in nodes]
        new_arrays, new_nodes = _rewrite_input(f"q{index}", source, [n.output[0] for n in nodes], mats, ranges[source])
        arrays |= new_arrays
        inserted[nodes[0].output[0]] = new_nodes
    spliced = []
    if consumers:
        arrays["q_one_axis"] = np.array([1], np.int64)
        spliced += _token_zero_point()
    replaced = {n.output[0] for n in targets}
    for node in graph.node:
        spliced += inserted.get(node.output[0], [] if node.output[0] in replaced else [node])
    still_used = {i for n in spliced for i in n.input}
    kept = [w for w in graph.initializer if w.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(value, name) for name, value in arrays.items()])
    del graph.node[:]
    graph.node.extend(spliced)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out_path))
    return out_path


def _at_opset(model, version: int):
    """The model converted to the default domain's `version` where it is older (ONNX Runtime's contrib operators
    are left as they are). Converting before ONNX Runtime's fusions instead measured slower (Zen 5: 343 against
    412 texts/s one text per call), so it comes after them, where an export below opset 17 with a fused
    LayerNormalization has no converter: that is said plainly."""
    from onnx import version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    try:
        return version_converter.convert_version(model, version)
    except Exception as exc:  # noqa: BLE001 - onnx raises its own and C++ errors here
        raise RuntimeError(
            f"int8 needs opset {version} (blocked QuantizeLinear), and this export's opset {current} did not convert "
            f"({exc}); export at opset 17 or newer"
        ) from exc


def _token_zero_point() -> list:
    """`TOKEN_ZERO_POINT`, 128 for each token of the input ids: (batch, tokens, 1), the shape of a per-token scale."""
    from onnx import TensorProto, helper

    return [
        helper.make_node("Shape", ["input_ids"], ["q_ids_shape"], name="q_ids_shape"),
        helper.make_node("Concat", ["q_ids_shape", "q_one_axis"], ["q_zero_point_shape"], name="q_zp_shape", axis=0),
        helper.make_node(
            "ConstantOfShape", ["q_zero_point_shape"], [TOKEN_ZERO_POINT], name="q_token_zero_point",
            value=helper.make_tensor("q_128", TensorProto.UINT8, [1], [128]),
        ),
    ]


def _rewrite_input(
    p: str, source: str, outputs: list[str], mats: list[np.ndarray], amax: np.ndarray
) -> tuple[dict[str, np.ndarray], list]:
    """The MatMuls that read `source` (batch, tokens, channels; weights `mats`, results `outputs`) as one
    per-token int8 product.

    The consumers of one input (attention's query, key and value) share its quantization and become one
    product, split after.
    """
    from onnx import helper

    amax = np.maximum(amax, 1e-6)
    wmax = np.maximum(np.max([np.abs(w).max(axis=1) for w in mats], axis=0), 1e-6)
    smooth = amax**SMOOTHING_ALPHA / wmax ** (1 - SMOOTHING_ALPHA)
    outliers = np.sort(np.argsort(-(amax / smooth))[: math.ceil(len(amax) / OUTLIER_SHARE)])
    inverse = 1.0 / smooth
    inverse[outliers] = 0.0  # those channels take the fp32 path
    w = np.concatenate(mats, axis=1)
    smoothed = w * smooth[:, None]
    smoothed[outliers] = 0.0
    w_scale = np.maximum(np.abs(smoothed).max(axis=0), 1e-12) / WEIGHT_LEVELS
    arrays = {
        f"{p}_inverse": inverse.astype(np.float32),
        f"{p}_outliers": outliers.astype(np.int64),
        f"{p}_w": np.clip(np.round(smoothed / w_scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8),
        f"{p}_w_scale": w_scale.astype(np.float32),
        f"{p}_w_outliers": w[outliers].astype(np.float32),
    }
    node = helper.make_node
    joined = outputs[0] if len(outputs) == 1 else f"{p}_joined"
    nodes = [
        # each row (token): one scale from its largest |value|, values as u8 around 128 (no clipping needed:
        # |value| / scale <= 127 by the scale's definition)
        node("Mul", [source, f"{p}_inverse"], [f"{p}_smoothed"]),
        node("Abs", [f"{p}_smoothed"], [f"{p}_abs"]),
        node("ReduceMax", [f"{p}_abs", "q_last_axis"], [f"{p}_max"], keepdims=1),
        node("Max", [f"{p}_max", "q_tiny"], [f"{p}_range"]),
        node("Mul", [f"{p}_range", "q_step"], [f"{p}_scale"]),
        node("QuantizeLinear", [f"{p}_smoothed", f"{p}_scale", TOKEN_ZERO_POINT], [f"{p}_u8"], axis=-1,
             block_size=len(amax)),
        # exact integer product scaled per column in one fused kernel, then per row, plus the outlier channels in fp32
        node(
            "MatMulIntegerToFloat", [f"{p}_u8", f"{p}_w", "q_one", f"{p}_w_scale", "q_zero_point"],
            [f"{p}_column_scaled"], domain=MS_DOMAIN,
        ),
        node("Mul", [f"{p}_column_scaled", f"{p}_scale"], [f"{p}_int8_part"]),
        node("Gather", [source, f"{p}_outliers"], [f"{p}_wide"], axis=-1),
        node("MatMul", [f"{p}_wide", f"{p}_w_outliers"], [f"{p}_fp32_part"]),
        node("Add", [f"{p}_int8_part", f"{p}_fp32_part"], [joined]),
    ]
    if len(outputs) > 1:
        widths = [m.shape[1] for m in mats]
        arrays[f"{p}_widths"] = np.array(widths, np.int64)
        nodes.append(node("Split", [joined, f"{p}_widths"], outputs, axis=-1))
    return arrays, nodes


def _activation_ranges(
    model, names: list[str], calibration: list[list[int]]
) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """The largest |value| of each input channel of the named tensors over the calibration texts, and whether
    each tensor's rows are the tokens ((1, tokens, channels) for every text, run alone)."""
    import onnx
    import onnxruntime as ort

    from bentoformers.runtime.encoder import feed

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    ranges = {name: np.zeros(0) for name in names}
    per_token = dict.fromkeys(names, True)
    for ids in calibration:
        for name, value in zip(names, session.run(names, feed([ids], inputs))):
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0).astype(np.float64)
            ranges[name] = channel_max if ranges[name].size == 0 else np.maximum(ranges[name], channel_max)
            per_token[name] &= value.shape[:2] == (1, len(ids)) and value.ndim == 3
    # and in a batch: a tensor that keeps one row set for the whole batch (broadcast) is not per token
    pair = [min(calibration, key=len), max(calibration, key=len)]
    for name, value in zip(names, session.run(names, feed(pair, inputs))):
        per_token[name] &= value.shape[:2] == (2, len(pair[1]))
    return ranges, per_token


def quantize_decoder_int8(onnx_path: Path, out_path: Path, block_size: int = 32) -> Path:
    """int8 weights, fp32 activations (ONNX Runtime's MatMulNBits), for decoders.

    Dynamic int8 quantizes activations with one scale per tensor, so in a batch of decoding sequences
    each row's rounding would depend on its neighbours and greedy tokens would change with the batch.
    Weight-only int8 keeps rows independent; decoding one token per sequence is bound by reading the
    weights, which this shrinks four-fold. Gemm nodes (how GPT-2's Conv1D layers export) become
    MatMul + Add first, since the quantizer rewrites MatMul.
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(onnx_path))
    graph = model.graph
    weights = {w.name: w for w in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.from_array(numpy_helper.to_array(weights[weight]).T.copy(), f"{weight}_t")
            graph.initializer.append(transposed)
            weight = transposed.name
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    # accuracy_level 4: int8 compute with activations quantized per block of each row (still row-independent);
    # the default (fp32 compute, weights dequantized per call) measured 7x slower here.
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",)
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path

"""Build-side steps: resolve a checkpoint, export it to ONNX, optimise, compute the fp32 reference (quantize.py quantizes)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bentoformers.runtime.card import ONNX_FILE, ModelCard
from bentoformers.runtime.encoder import POOLED_OUTPUT, SPARSE_OUTPUT, l2_normalize, pool
from bentoformers.tasks import TASKS

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json", "generation_config.json",
    "chat_template.jinja",
)


def resolve_source(source: str, revision: str | None = None) -> tuple[Path, str]:
    """A local folder, `package:<module>` (a package whose get_model_path() is a HF folder) or a hub id.

    Returns the local folder and a revision string for the labels.
    """
    if source.startswith("package:"):
        module = importlib.import_module(source.removeprefix("package:"))
        folder = Path(module.get_model_path())
        dist = module.__name__.replace("_", "-")
        return folder, f"{dist}=={importlib.metadata.version(dist)}+{content_hash(folder)}"
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder.resolve(), content_hash(folder)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(source, revision=revision)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise RuntimeError(
            f"cannot fetch {source!r} from the model hub ({exc.__class__.__name__}); "
            "give a local folder instead, or check the network and the id"
        ) from exc
    return Path(path), Path(path).name  # the snapshot folder is named after the commit


def content_hash(folder: Path) -> str:
    """A short hash of the weights and configs, so a changed local checkpoint is rebuilt."""
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".txt", ".model", ".jinja"}:
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return "sha256-" + digest.hexdigest()[:16]


def sentence_transformers_config(folder: Path) -> dict[str, object]:
    """Pooling, normalisation, max length and prompts as the checkpoint's sentence-transformers files say."""
    found: dict[str, object] = {}
    modules = folder / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            kind = module.get("type", "")
            if kind.endswith("Normalize"):
                found["normalize"] = True
            if kind.endswith("Pooling"):
                cfg = json.loads((folder / module["path"] / "config.json").read_text())
                found["pooling"] = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        found.setdefault("normalize", False)
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        found["max_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    model_config = folder / "config_sentence_transformers.json"
    if model_config.is_file():
        config = json.loads(model_config.read_text())
        found["prompts"] = dict(config.get("prompts") or {})
        found["default_prompt_name"] = config.get("default_prompt_name") or ""
    return found


def export_onnx(folder: Path, out: Path, task: str = "embeddings", pooling: str = "mean") -> Path:
    """optimum's exporter, with dynamic batch and sequence axes; an embeddings graph gets its pooling appended
    (`append_pooling`), so every variant built from it has it. Without the framework warnings a user cannot
    act on: the tracer's and the exporter's notes on what a traced graph may get wrong (the build validates
    the graph against PyTorch instead), optimum's tied-weight deduplication asking for `accelerate` (it only
    shrinks the file) and transformers' deprecation of the `torch_dtype` that optimum passes."""
    import torch
    from optimum.exporters.onnx import main_export

    with (
        warnings.catch_warnings(),
        _dropping_log("optimum.exporters.onnx.base", "requires accelerate"),
        _dropping_log("transformers.configuration_utils", "`torch_dtype` is deprecated"),
    ):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        main_export(
            str(folder), output=str(out), task=TASKS[task].export, library_name="transformers", do_validation=False
        )
    if TASKS[task].output == "pooled":
        append_pooling(out / ONNX_FILE, pooling)
    if TASKS[task].output == "sparse":
        append_splade_pooling(out / ONNX_FILE)
    return out / ONNX_FILE


def append_splade_pooling(path: Path) -> None:
    """Adds SPLADE's pooling to a masked-LM graph: `sparse_max` (batch, vocab) = relu(max over the text's tokens of
    logits * mask). max, relu and log1p are monotone, so log1p of it (after the model: runtime/encoder.py) is
    SPLADE's max over the tokens of log(1 + relu(logits * mask)); only (batch, vocab) leaves the session. Each
    row is its own text's maximum, so a text's weights do not depend on its batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    p = POOLING_PREFIX
    graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), f"{p}last_axis"),
                              numpy_helper.from_array(np.array([1], np.int64), f"{p}sequence_axis")])
    graph.node.extend([
        helper.make_node("Cast", ["attention_mask"], [f"{p}mask"], name=f"{p}cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [f"{p}mask", f"{p}last_axis"], [f"{p}weights"], name=f"{p}unsqueeze"),
        helper.make_node("Mul", ["logits", f"{p}weights"], [f"{p}masked"], name=f"{p}mul"),
        helper.make_node("ReduceMax", [f"{p}masked", f"{p}sequence_axis"], [f"{p}max"], name=f"{p}max", keepdims=0),
        helper.make_node("Relu", [f"{p}max"], [SPARSE_OUTPUT], name=f"{p}relu"),
    ])
    graph.output.append(helper.make_tensor_value_info(SPARSE_OUTPUT, TensorProto.FLOAT, ["batch_size", "vocab"]))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


def reference_sparse(folder: Path, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """The reference SPLADE weights, a dense row per text: sentence-transformers' SparseEncoder on the checkpoint
    (a *ForMaskedLM: its Transformer(fill-mask) and SpladePooling), in fp32. Only max pooling with the relu
    activation is built (the graph's pooling); a checkpoint configured otherwise is refused."""
    import torch
    from sentence_transformers import SparseEncoder

    encoder = SparseEncoder(str(folder), device="cpu", model_kwargs={"dtype": torch.float32})
    pooling = encoder[-1]
    strategy, activation = getattr(pooling, "pooling_strategy", "max"), getattr(pooling, "activation_function", "relu")
    if (strategy, activation) != ("max", "relu"):
        raise ValueError(f"{folder}: SPLADE pooling {strategy} with activation {activation} is not supported "
                         "(only max with relu)")
    encoder.max_seq_length = max_length
    rows = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, convert_to_sparse_tensor=False,
                          max_active_dims=None)
    return rows.to(torch.float32).numpy()


CPU_GRAPH = "residual adds apart from their layer norms"  # what a CPU graph is built as (store versions: builder.py)
POOLING_PREFIX = "pooling_"  # the appended nodes' and tensors' names: fp16 conversion leaves these in fp32


def append_pooling(path: Path, pooling: str) -> None:
    """Adds the pooling to an encoder graph as ONNX nodes: `sentence_embedding` (batch, dims), the mean of
    `last_hidden_state` over the attention mask (or its first token, for CLS), as `pool` computes it in numpy.
    Only that leaves the session, not the hidden state (on a GPU, fetching the hidden state and pooling it on
    the host cost 16x the throughput). Each row is a product of its own mask and hidden state (padding weighted
    0, no sum across rows), so a text's vector does not depend on its batch. L2 normalisation stays after
    the model (api/embeddings.py): a request may ask for the raw vector (`normalize: false`).
    `last_hidden_state` stays an output, unfetched, for checks against the numpy pooling."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    p = POOLING_PREFIX
    hidden = "last_hidden_state"
    if pooling == "cls":
        constants = {f"{p}first": np.array(0, np.int64)}
        nodes = [helper.make_node("Gather", [hidden, f"{p}first"], [POOLED_OUTPUT], name=f"{p}gather", axis=1)]
    else:
        constants = {
            f"{p}last_axis": np.array([-1], np.int64),
            f"{p}sequence_axis": np.array(1, np.int32),
            f"{p}last_token": np.array(-1, np.int64),
            f"{p}tiny": np.array(1e-9, np.float32),
        }
        step = [
            ("Cast", ["attention_mask"], "mask", {"to": TensorProto.FLOAT}),
            ("Unsqueeze", ["mask", "last_axis"], "weights", {}),
            ("Mul", [hidden, "weights"], "weighted", {}),
            # A running sum over the tokens, read at the last one: each row summed in token order, so padding
            # (adding zeros) changes nothing; ReduceSum's order, and so its rounding, varies with the length.
            ("CumSum", ["weighted", "sequence_axis"], "running", {}),
            ("Gather", ["running", "last_token"], "sum", {"axis": 1}),
            ("ReduceSum", ["weights", "sequence_axis_list"], "count", {"keepdims": 0}),  # whole numbers: exact
            ("Max", ["count", "tiny"], "divisor", {}),
            ("Div", ["sum", "divisor"], POOLED_OUTPUT, {}),
        ]
        constants[f"{p}sequence_axis_list"] = np.array([1], np.int64)
        local = {hidden, "attention_mask", POOLED_OUTPUT}
        nodes = [
            helper.make_node(op, [i if i in local else p + i for i in inputs],
                             [out if out in local else p + out], name=f"{p}{index}_{op.lower()}", **attrs)
            for index, (op, inputs, out, attrs) in enumerate(step)
        ]
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    graph.node.extend(nodes)
    graph.output.append(helper.make_tensor_value_info(POOLED_OUTPUT, TensorProto.FLOAT, ["batch_size", "dimensions"]))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


def sum_pooling_for_gpu(model) -> None:
    """Swaps the pooling's running sum for a ReduceSum over the tokens, in place: ONNX Runtime's CUDA CumSum
    loops over each element's whole prefix (tokens squared), while ReduceSum is one reduction. On a GPU, as
    with fp16 there, results are not bit-exact across batches anyway."""
    from onnx import helper

    p = POOLING_PREFIX
    nodes = list(model.graph.node)
    running = next((i for i, n in enumerate(nodes) if n.name.startswith(p) and n.op_type == "CumSum"), None)
    if running is None:  # CLS pooling sums nothing
        return
    weighted, axes, out = nodes[running].input[0], f"{p}sequence_axis_list", nodes[running + 1].output[0]
    nodes[running : running + 2] = [
        helper.make_node("ReduceSum", [weighted, axes], [out], name=f"{p}sum_reducesum", keepdims=0)
    ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in (f"{p}sequence_axis", f"{p}last_token")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def pooling_nodes(model) -> list[str]:
    """The names of the nodes `append_pooling` added."""
    return [n.name for n in model.graph.node if n.name.startswith(POOLING_PREFIX)]


@contextlib.contextmanager
def _dropping_log(logger_name: str, text: str) -> Iterator[None]:
    """Drops the records of one logger whose message holds `text`, for the duration."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def optimize(
    onnx_path: Path, out_path: Path, for_gpu: bool, fp16: bool = False, fuse: bool = True, for_int8: bool = False
) -> Path:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU); fp16 keeps fp32 inputs/outputs.

    Architectures the fusion passes do not know are converted (fp16) or copied as exported. A CPU graph keeps the
    residual add apart from its layer norm: SkipLayerNormalization ran slower on CPU (runtime/session.py,
    ENCODER_CPU_DISABLED_OPTIMIZERS). `for_int8`: the graph that build/quantize.py rewrites, with GELU and its bias, and
    the layer norms, fused, but neither attention (the fused operator holds the query, key and value weights,
    which then could not be quantized) nor the embeddings' layer norm.
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    config = json.loads((onnx_path.parent / "config.json").read_text())
    model_type = config.get("model_type", "bert")
    if not fuse or model_type not in MODEL_TYPES:
        model = onnx.load(str(onnx_path))
        if for_gpu:
            sum_pooling_for_gpu(model)
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=True, node_block_list=pooling_nodes(model))
        onnx.save_model(model, str(out_path))
        return out_path
    options = FusionOptions(model_type)
    if not for_gpu:
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    if for_int8:
        options.enable_attention = options.enable_embed_layer_norm = False
    optimized = optimize_model(
        str(onnx_path),
        model_type=model_type,
        num_heads=config.get("num_attention_heads", 0),
        hidden_size=config.get("hidden_size", 0),
        optimization_options=options,
        opt_level=1,
        use_gpu=for_gpu,
    )
    if for_gpu:
        sum_pooling_for_gpu(optimized.model)
    if fp16:  # the pooling stays fp32: a sum over hundreds of tokens
        optimized.convert_float_to_float16(keep_io_types=True, node_block_list=pooling_nodes(optimized.model))
    onnx.save_model(optimized.model, str(out_path))
    return out_path


Texts = list[str] | list[tuple[str, str]]  # texts, or pairs (query and document, premise and hypothesis)


def reference_embeddings(folder: Path, texts: list[str], card: ModelCard, batch_size: int = 32) -> np.ndarray:
    """The fp32 PyTorch reference, pooled and normalised exactly as the served model is."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    def pooled(out, enc) -> np.ndarray:
        return pool(out.last_hidden_state.numpy(), enc["attention_mask"].numpy(), card.pooling)

    vectors = np.stack(_run_reference(folder, model, texts, card.max_length, batch_size, pooled))
    return l2_normalize(vectors) if card.normalize else vectors


def reference_logits(folder: Path, texts: Texts, max_length: int, batch_size: int = 32) -> np.ndarray:
    """The fp32 PyTorch classifier's logits on the texts or pairs, a row each."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    return np.stack(_run_reference(folder, model, texts, max_length, batch_size, lambda out, enc: out.logits.numpy()))


def reference_token_logits(folder: Path, texts: list[str], max_length: int, batch_size: int = 32) -> list[np.ndarray]:
    """The fp32 PyTorch token classifier's logits: a (tokens, labels) array per text, special tokens included."""
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(folder, dtype=torch.float32).eval()

    def per_text(out, enc) -> list[np.ndarray]:
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        return [row[:n] for row, n in zip(out.logits.numpy(), lengths)]

    return _run_reference(folder, model, texts, max_length, batch_size, per_text)


def _run_reference(folder: Path, model, texts: Texts, max_length: int, batch_size: int, take) -> list[np.ndarray]:
    """Runs the PyTorch model over the texts in padded batches; `take(output, encoding)` gives each batch's rows."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            args = [list(t) for t in zip(*batch)] if isinstance(batch[0], tuple) else [batch]
            enc = tokenizer(*args, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            rows.extend(take(model(**enc), enc))
    return rows


def reference_greedy(folder: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The fp32 PyTorch causal LM's greedy continuation of each prompt (token ids), one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                pad_token_id=model.config.eos_token_id or 0,
            )
            out.append(generated[0, len(prompt) :].tolist())
    return out


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)

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
from bentoformers.runtime.encoder import l2_normalize, pool
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


def export_onnx(folder: Path, out: Path, task: str = "embeddings") -> Path:
    """optimum's exporter, with dynamic batch and sequence axes. Without the framework warnings a user cannot
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
    return out / ONNX_FILE


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


def optimize(onnx_path: Path, out_path: Path, for_gpu: bool, fp16: bool = False, fuse: bool = True) -> Path:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU); fp16 keeps fp32 inputs/outputs.

    Architectures the fusion passes do not know are converted (fp16) or copied as exported.
    """
    import onnx
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    config = json.loads((onnx_path.parent / "config.json").read_text())
    model_type = config.get("model_type", "bert")
    if not fuse or model_type not in MODEL_TYPES:
        model = onnx.load(str(onnx_path))
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=True)
        onnx.save_model(model, str(out_path))
        return out_path
    optimized = optimize_model(
        str(onnx_path),
        model_type=model_type,
        num_heads=config.get("num_attention_heads", 0),
        hidden_size=config.get("hidden_size", 0),
        opt_level=1,
        use_gpu=for_gpu,
    )
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=True)
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

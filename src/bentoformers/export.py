"""Build-side steps: resolve a checkpoint, export it to ONNX, optimise, quantize, compute the fp32 reference."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np

from .engine import ONNX_FILE, ModelCard, l2_normalize, pool

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")


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
        if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".txt", ".model"}:
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return "sha256-" + digest.hexdigest()[:16]


def sentence_transformers_config(folder: Path) -> dict[str, object]:
    """Pooling, normalisation and max length as the checkpoint's sentence-transformers files say."""
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
    return found


def export_onnx(folder: Path, out: Path) -> Path:
    """optimum's exporter: the encoder's last_hidden_state, dynamic batch and sequence axes."""
    from optimum.exporters.onnx import main_export

    main_export(
        str(folder), output=str(out), task="feature-extraction", library_name="transformers", do_validation=False
    )
    return out / ONNX_FILE


def optimize(onnx_path: Path, out_path: Path, for_gpu: bool, fp16: bool = False) -> Path:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU); fp16 keeps fp32 inputs/outputs."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((onnx_path.parent / "config.json").read_text())
    optimized = optimize_model(
        str(onnx_path),
        model_type="bert",
        num_heads=config.get("num_attention_heads", 0),
        hidden_size=config.get("hidden_size", 0),
        opt_level=1,
        use_gpu=for_gpu,
    )
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=True)
    onnx.save_model(optimized.model, str(out_path))
    return out_path


def quantize_int8(onnx_path: Path, out_dir: Path) -> Path:
    """Dynamic int8 with per-channel weights (per-tensor loses far more fidelity at the same speed)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    quantizer = ORTQuantizer.from_pretrained(onnx_path.parent, file_name=onnx_path.name)
    quantizer.quantize(config, save_dir=out_dir, file_suffix="int8")
    return out_dir / f"{onnx_path.stem}_int8.onnx"


def reference_embeddings(folder: Path, texts: list[str], card: ModelCard, batch_size: int = 32) -> np.ndarray:
    """The fp32 PyTorch reference, pooled and normalised exactly as the served model is."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=card.max_length,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state.numpy()
            rows.append(pool(hidden, enc["attention_mask"].numpy(), card.pooling))
    vectors = np.concatenate(rows)
    return l2_normalize(vectors) if card.normalize else vectors


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)

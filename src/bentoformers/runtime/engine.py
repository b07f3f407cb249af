"""The runtime: tokenize (gateway side) and run the ONNX graph and pooling (model-service side).

No BentoML here, so the build step, the service and the benchmark all use the same code.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

CARD_FILE = "bentoformers.json"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class ModelCard:
    """What the runtime needs to know about a built artefact; written beside the graph by the build."""

    name: str
    task: str
    precision: str
    max_length: int  # token limit; for generation the context (prompt plus new tokens)
    # embeddings
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = False
    dimensions: int = 0  # embeddings: vector size; classification: number of labels
    # classification: labels in logit order (the checkpoint's id2label); sigmoid per label when multi-label
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    # generation: the tokens that end a sequence
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def load(cls, folder: str | Path) -> ModelCard:
        data = json.loads((Path(folder) / CARD_FILE).read_text())
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def save(self, folder: str | Path) -> None:
        (Path(folder) / CARD_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


class InputTooLong(ValueError):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"item {index} has {tokens} tokens; the limit is {limit}")
        self.index, self.tokens, self.limit = index, tokens, limit


class TextTokenizer:
    """The Rust tokenizer, without padding (the encoder pads) and with the model's token limit."""

    def __init__(self, folder: str | Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._whole = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self._whole.no_padding()
        self._whole.no_truncation()
        self._truncating = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length)

    def encode(self, texts: list[str], truncate: bool) -> list[list[int]]:
        tokenizer = self._truncating if truncate else self._whole
        # encode_batch hands work to a thread pool: worth it for many texts, pure overhead for one.
        ids = [tokenizer.encode(texts[0]).ids] if len(texts) == 1 else [e.ids for e in tokenizer.encode_batch(texts)]
        if not truncate:
            for i, seq in enumerate(ids):
                if len(seq) > self.max_length:
                    raise InputTooLong(i, len(seq), self.max_length)
        return ids


    def ids(self, text: str) -> list[int]:
        """One text, whole (a prompt: the caller checks it against the context)."""
        return self._whole.encode(text).ids

    def decode_stream(self) -> TextStream:
        return TextStream(self._whole)


class TextStream:
    """Token ids in, text out as soon as it is whole (a byte-level token can end inside a character)."""

    def __init__(self, tokenizer) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self._stream.step(self._tokenizer, token) or ""


def pick_device(requested: str = "auto") -> str:
    import onnxruntime as ort

    # onnxruntime-gpu lists the CUDA provider even where no GPU driver is (libcuda.so.1), and then runs
    # on CPU with only a log line; "auto" therefore also asks for the driver.
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _has_cuda_driver()
    if requested == "cuda" and not has_cuda:
        raise RuntimeError("device=cuda was asked for, but onnxruntime has no usable CUDAExecutionProvider")
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    return requested


def open_session(path: str | Path, device: str = "cpu", intra_op_threads: int = 0, inter_op_threads: int = 0):
    """The one way a graph is opened: an ONNX Runtime session on `device`, which really runs there.

    ONNX Runtime falls back to CPU with only a log line when CUDA cannot start; a model service that then
    said `cuda` in /v1/models and its metrics would be lying, so that is an error here.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0: ONNX Runtime's default (one per core)
    options.inter_op_num_threads = inter_op_threads
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels (the GPU image has no system CUDA)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"ONNX Runtime could not start CUDA for {path} (see its log above); not serving on CPU")
    return session


def _has_cuda_driver() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class OnnxEncoder:
    """Runs a built encoder graph: pooled embeddings, or a classifier's logits.

    A text's embedding never depends on what else is in the batch:
    - int8 graphs quantize activations with one scale per tensor, so a neighbour in the batch would
      change every row's rounding. Each text therefore runs alone; texts run in parallel, one
      single-threaded inference per core, which on CPU is within ~15% of padded batching and has no
      padding waste at all.
    - fp32/fp16 graphs run in length-sorted sub-batches (little padding) under a token budget;
      padding is masked, so rows are independent.
    """

    def __init__(
        self,
        folder: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        max_batch_tokens: int = 8192,
    ) -> None:
        self.folder = Path(folder)
        self.card = ModelCard.load(folder)
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        workers = 1 if device == "cuda" else (threads or os.cpu_count() or 1)
        # On CPU, one single-threaded inference per core (see the class docstring).
        self.session = open_session(
            self.folder / ONNX_FILE, device, intra_op_threads=1 if device == "cpu" else 0, inter_op_threads=1
        )
        self._input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self._pooled = self.card.task == "embeddings"
        wanted = "last_hidden_state" if self._pooled else "logits"
        self._output = wanted if wanted in outputs else outputs[0]
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="onnx")
        self.per_item = self.card.precision == "int8"

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """Token ids in, float32 rows out (one per input, same order): pooled embeddings or logits."""
        out = np.empty((len(batch), self.card.dimensions), dtype=np.float32)
        if not batch:
            return out
        groups = [[i] for i in range(len(batch))] if self.per_item else self._plan(batch)
        results = self._pool.map(lambda g: self._run([batch[i] for i in g]), groups)
        for group, rows in zip(groups, results):
            out[group] = rows
        return out

    def _plan(self, batch: list[list[int]]) -> list[list[int]]:
        """Length-sorted groups whose padded size fits the token budget and whose padding stays small."""
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        groups: list[list[int]] = []
        group: list[int] = []
        for i in order:
            length = len(batch[i])
            if group and (
                (len(group) + 1) * length > self.max_batch_tokens
                or length > len(batch[group[0]]) * 1.25 + 4
            ):
                groups.append(group)
                group = []
            group.append(i)
        groups.append(group)
        return groups

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        out = self.session.run([self._output], feed)[0].astype(np.float32, copy=False)
        return pool(out, mask, self.card.pooling) if self._pooled else out

    classify = embed


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        return hidden[:, 0]
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def label_scores(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """A classifier's logits as scores: a sigmoid per label for multi-label models, else a softmax."""
    logits = logits.astype(np.float64)
    if multi_label:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)

"""What the runtime needs to know about a built artefact: the card the build writes beside the graph."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

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
    dimensions: int = 0  # embeddings: vector size; classification, token-classification: number of labels
    matryoshka_dimensions: tuple[int, ...] = ()  # embeddings: the sizes its vectors may be cut to, largest (full) first
    prompts: dict[str, str] = field(default_factory=dict)  # embeddings: name -> the text put before each input
    default_prompt_name: str = ""  # embeddings: the prompt used when a request names none ("": none)
    # classification, token-classification: labels in logit order (the checkpoint's id2label); sigmoid per
    # label when multi-label
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    # generation: the tokens that end a sequence
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str = ""  # Jinja (runtime/chat.py); "" when the checkpoint and the model list give none
    # classification: the logit of the entailment label of an NLI model (zero-shot classification); -1: none
    entailment_index: int = -1
    # embeddings: per quantized output type, its retrieval figure against float on held-out texts, its gate and
    # whether it is offered (build/builder.py output_figures); and per servable size, the int8/uint8 ranges
    # (min row, max row; float32 values) calibrated once per model on the fp32 PyTorch reference.
    output_types: dict[str, dict] = field(default_factory=dict)
    output_ranges: dict[str, list[list[float]]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> ModelCard:
        data = json.loads((Path(folder) / CARD_FILE).read_text())
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def save(self, folder: str | Path) -> None:
        (Path(folder) / CARD_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

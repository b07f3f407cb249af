"""The declarative model list (build/models.yaml): what to build, from which checkpoint, with which gates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bentoformers.settings import Precision

Task = Literal["embeddings", "classification", "rerank", "token-classification", "generation"]

# Fidelity gates against the fp32 PyTorch reference; a variant below them is not saved.
# embeddings: cosine and nearest-neighbour overlap on the shipped sentences;
# classification: top-label agreement and the largest probability difference on the shipped sentences
#   (premise/hypothesis pairs for an NLI model, the zero-shot classifier);
# rerank: per query, the top document and Kendall's tau of the order, on the shipped query/document sets,
#   and the largest difference of a relevance score (the sigmoid of the logit);
# token-classification: each real token's top label, and the largest probability difference;
# generation: greedy tokens that agree (up to each prompt's first divergence) on fixed prompts.
DEFAULT_GATES: dict[str, dict[str, dict[str, float]]] = {
    "embeddings": {
        "fp32": {"min_cosine": 0.9999, "mean_cosine": 0.99999, "neighbour_overlap": 0.99},
        "fp16": {"min_cosine": 0.999, "mean_cosine": 0.9999, "neighbour_overlap": 0.95},
        "int8": {"min_cosine": 0.99, "mean_cosine": 0.998, "neighbour_overlap": 0.95},
    },
    "classification": {
        "fp32": {"label_agreement": 1.0, "max_prob_diff": 1e-4},
        "fp16": {"label_agreement": 0.99, "max_prob_diff": 0.01},
        "int8": {"label_agreement": 0.99, "max_prob_diff": 0.1},
    },
    "rerank": {
        "fp32": {"top1_agreement": 1.0, "kendall_tau": 0.999, "max_score_diff": 1e-4},
        "fp16": {"top1_agreement": 0.99, "kendall_tau": 0.95, "max_score_diff": 0.01},
        "int8": {"top1_agreement": 0.99, "kendall_tau": 0.95, "max_score_diff": 0.1},
    },
    "token-classification": {
        "fp32": {"label_agreement": 1.0, "max_prob_diff": 1e-4},
        "fp16": {"label_agreement": 0.99, "max_prob_diff": 0.01},
        "int8": {"label_agreement": 0.99, "max_prob_diff": 0.1},
    },
    "generation": {
        "fp32": {"token_agreement": 1.0},
        "fp16": {"token_agreement": 0.9},
        "int8": {"token_agreement": 0.8},
    },
}
# Figures that must stay at or below their gate; every other figure must reach it.
UPPER_BOUNDS = frozenset({"max_prob_diff", "max_score_diff"})


def gate_failures(figures: dict[str, float], gates: dict[str, float]) -> list[str]:
    failed = []
    for name, bound in gates.items():
        value = figures[name]
        if (value > bound) if name in UPPER_BOUNDS else (value < bound):
            failed.append(f"{name} {value:.5f} {'>' if name in UPPER_BOUNDS else '<'} {bound}")
    return failed


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: Precision
    gates: dict[str, float] | None = Field(None, description="Overrides the task's default gates (spec.DEFAULT_GATES).")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=40)
    source: str = Field(description="Hub id, local folder, or package:<module> for a package that ships a model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    task: Task = "embeddings"
    pooling: Literal["auto", "mean", "cls"] = Field("auto", description="embeddings only")
    normalize: bool | None = Field(None, description="embeddings only; None: as the checkpoint's sentence-transformers config says.")
    matryoshka_dimensions: list[int] | None = Field(
        None, description="embeddings only: the sizes a Matryoshka-trained model's vectors may be cut to (each at most "
        "its hidden size), which `dimensions` in a request may then ask for.",
    )
    prompts: dict[str, str] | None = Field(
        None, description="embeddings only: named prompts (e.g. query: 'query: ') that replace the checkpoint's "
        "sentence-transformers `prompts`; its `default_prompt_name` still applies if it names one of these.",
    )
    max_length: int | None = Field(None, ge=8, description="Token limit (generation: the context, prompt plus new tokens).")
    chat_template: str | None = Field(
        None, description="generation only: the chat template for /v1/chat/completions, for checkpoints without "
        "one (or to replace theirs): a built-in name (dialogpt, chatml), a .jinja file, or the Jinja text.",
    )
    variants: list[VariantSpec] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique_precisions(cls, variants: list[VariantSpec]) -> list[VariantSpec]:
        seen = [v.precision for v in variants]
        if len(seen) != len(set(seen)):
            raise ValueError("each precision may appear once")
        return variants

    @model_validator(mode="after")
    def _gates_fit_the_task(self) -> ModelSpec:
        known = set(DEFAULT_GATES[self.task]["fp32"])
        for variant in self.variants:
            unknown = set(variant.gates or {}) - known
            if unknown:
                raise ValueError(f"{self.task} gates are {sorted(known)}; unknown: {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _chat_template_for_generation(self) -> ModelSpec:
        if self.chat_template is not None and self.task != "generation":
            raise ValueError("chat_template is for generation models only")
        return self

    @model_validator(mode="after")
    def _embedding_options_for_embeddings(self) -> ModelSpec:
        if self.task != "embeddings" and (self.matryoshka_dimensions is not None or self.prompts is not None):
            raise ValueError("matryoshka_dimensions and prompts are for embeddings models only")
        sizes = self.matryoshka_dimensions or []
        if any(size < 1 for size in sizes) or len(sizes) != len(set(sizes)):
            raise ValueError("matryoshka_dimensions must be distinct sizes of at least 1")
        if self.prompts is not None and any(not name for name in self.prompts):
            raise ValueError("a prompt's name may not be empty")
        return self

    def gates(self, variant: VariantSpec) -> dict[str, float]:
        return {**DEFAULT_GATES[self.task][variant.precision], **(variant.gates or {})}


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        if len(names) != len(set(names)):
            raise ValueError("each model name may appear once")
        return models


def load_model_list(path: str | Path) -> list[ModelSpec]:
    with open(path, encoding="utf-8") as f:
        return ModelList.model_validate(yaml.safe_load(f)).models


def store_name(model: str, precision: str) -> str:
    return f"{model}-{precision}"

"""The declarative model list (build/models.yaml): what to build, from which checkpoint, with which gates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bentoformers.settings import Precision
from bentoformers.tasks import TASKS, Task


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: Precision
    gates: dict[str, float] | None = Field(None, description="Overrides the task's default gates (tasks.py).")


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
    output_gates: dict[Literal["int8", "uint8", "binary", "ubinary"], float] | None = Field(
        None, description="embeddings only: per quantized output type, its least retrieval figure against float "
        "(replacing the task's: int8/uint8 0.97, binary/ubinary 0.95); a type below it is not offered.",
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
        known = set(TASKS[self.task].gates["fp32"])
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
        if self.task != "embeddings" and (self.matryoshka_dimensions is not None or self.prompts is not None
                                          or self.output_gates is not None):
            raise ValueError("matryoshka_dimensions, prompts and output_gates are for embeddings models only")
        sizes = self.matryoshka_dimensions or []
        if any(size < 1 for size in sizes) or len(sizes) != len(set(sizes)):
            raise ValueError("matryoshka_dimensions must be distinct sizes of at least 1")
        if self.prompts is not None and any(not name for name in self.prompts):
            raise ValueError("a prompt's name may not be empty")
        return self

    def output_gates_of(self) -> dict[str, float]:
        return {**(TASKS[self.task].output_gates or {}), **(self.output_gates or {})}

    def gates(self, variant: VariantSpec) -> dict[str, float]:
        return {**TASKS[self.task].gates[variant.precision], **(variant.gates or {})}


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

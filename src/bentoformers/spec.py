"""The declarative model list (build/models.yaml): what to build, from which checkpoint, with which gates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .settings import Precision

# Fidelity gates against the fp32 PyTorch reference on the shipped sentences; a variant below them is not saved.
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "fp32": {"min_cosine": 0.9999, "mean_cosine": 0.99999, "neighbour_overlap": 0.99},
    "fp16": {"min_cosine": 0.999, "mean_cosine": 0.9999, "neighbour_overlap": 0.95},
    "int8": {"min_cosine": 0.97, "mean_cosine": 0.99, "neighbour_overlap": 0.85},
}


class Gates(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_cosine: float = Field(ge=0, le=1)
    mean_cosine: float = Field(ge=0, le=1)
    neighbour_overlap: float = Field(ge=0, le=1)


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: Precision
    gates: Gates | None = None

    def effective_gates(self) -> Gates:
        return self.gates or Gates(**DEFAULT_GATES[self.precision])


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=40)
    source: str = Field(description="Hub id, local folder, or package:<module> for a package that ships a model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    task: Literal["embeddings"] = "embeddings"
    pooling: Literal["auto", "mean", "cls"] = "auto"
    normalize: bool | None = Field(None, description="None: as the checkpoint's sentence-transformers config says.")
    max_length: int | None = Field(None, ge=8)
    variants: list[VariantSpec] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique_precisions(cls, variants: list[VariantSpec]) -> list[VariantSpec]:
        seen = [v.precision for v in variants]
        if len(seen) != len(set(seen)):
            raise ValueError("each precision may appear once")
        return variants


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec] = Field(min_length=1)


def load_model_list(path: str | Path) -> list[ModelSpec]:
    with open(path, encoding="utf-8") as f:
        return ModelList.model_validate(yaml.safe_load(f)).models


def store_name(model: str, precision: str) -> str:
    return f"{model}-{precision}"

"""The one settings object. Only the composition root (service.py, the CLI) constructs it."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["fp32", "int8", "fp16"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BENTOFORMERS_", env_ignore_empty=True, frozen=True)

    model: str = Field("minilm", description="Served model name (the `name` of a build/models.yaml entry).")
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="auto: fp16 on CUDA when built, else int8, else fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 = one per CPU core.")
    max_items_per_request: int = Field(256, ge=1)
    max_chars_per_item: int = Field(
        100_000, ge=1, description="Refused before tokenizing, so a huge text cannot stall the gateway."
    )
    max_batch_items: int = Field(256, ge=1, description="Texts per call from gateway to model service.")
    max_batch_tokens: int = Field(16_384, ge=1, description="Token budget per call to the model service.")
    max_queued_items: int = Field(4096, ge=1, description="Beyond this the gateway answers 503.")
    retry_after_seconds: int = Field(1, ge=1)
    access_log: bool = Field(True, description="One JSON line per gateway request on stdout.")

    def threads(self) -> int:
        return self.intra_op_threads or (os.cpu_count() or 1)

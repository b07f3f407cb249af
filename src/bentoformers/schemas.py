"""Request bodies of the public routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class EmbedRequest(BaseModel):
    """POST /embed (native)."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr]
    normalize: StrictBool | None = Field(None, description="Default: as the model was trained.")
    truncate: StrictBool = Field(False, description="Cut texts over the model's token limit instead of refusing them.")
    model: StrictStr | None = None


class OpenAIEmbeddingRequest(BaseModel):
    """POST /v1/embeddings, as the OpenAI API defines it (extra fields such as `user` are ignored)."""

    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    truncate: StrictBool = False

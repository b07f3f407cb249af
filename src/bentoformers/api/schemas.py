"""Request bodies of the public routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


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


class ClassifyRequest(BaseModel):
    """POST /classify (native)."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr]
    top_k: StrictInt | None = Field(None, ge=1, description="Labels per text, best first; null or absent: all labels.")
    truncate: StrictBool = Field(False, description="Cut texts over the model's token limit instead of refusing them.")
    model: StrictStr | None = None


Stop = StrictStr | list[StrictStr] | None
MAX_CHOICES = 16  # `n`


class _Sampling(BaseModel):
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0, description="0: no limit.")
    seed: StrictInt | None = Field(None, ge=0)
    stream: StrictBool = False
    model: StrictStr | None = None


class GenerateRequest(_Sampling):
    """POST /generate (native). Greedy unless a temperature is given."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    stop: Stop = Field(None, description="Text that ends the generation (not included); up to 4.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class CompletionRequest(_Sampling):
    """POST /v1/completions, as the OpenAI API defines it (a prompt or a list, `n` choices each; `user` etc. ignored)."""

    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(16, ge=1)
    stop: Stop = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt, decoded together.")
    echo: Literal[False] = False
    logprobs: None = None
    stream_options: StreamOptions | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """A turn: system (or OpenAI's newer `developer`, rendered as system), user or assistant."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions, as the OpenAI API defines it (`user`, `metadata`, `store` etc. ignored;
    fields this server cannot honour are refused by name: api/chat.py)."""

    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stop: Stop = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES, description="Choices, decoded together.")
    stream_options: StreamOptions | None = None

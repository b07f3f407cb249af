"""Request and answer bodies of the public routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from bentoformers.errors import ErrorType
from bentoformers.spec import Task


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
    dimensions: StrictInt | None = Field(None, ge=1)
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


SEED_MAX = 2**63 - 1  # what the model service's int64 takes


class _Sampling(BaseModel):
    # Numbers only (no "0.5", no true), finite, in range; any value in range is safe to sample with.
    temperature: float | None = Field(None, ge=0, le=2, strict=True, allow_inf_nan=False, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, strict=True, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=0, le=2**31 - 1, description="0: no limit.")
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX)
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


class GenerateTextRequest(GenerateRequest):
    """POST /generate/stream: the generation as plain text pieces (BentoML's streaming convention)."""

    stream: Literal[True] = Field(True, description="Always a stream on this route.")


# Answers. The handlers write them as JSON directly (orjson, numpy arrays); these models describe them for
# the OpenAPI document and BentoML's client schema, and the tests hold the handlers to them.


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class GenerationUsage(Usage):
    completion_tokens: int


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    usage: Usage


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 values.")


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: Usage


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    model: str
    results: list[list[LabelScore]] = Field(description="Per text, its labels best first.")
    usage: Usage


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: GenerationUsage


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: GenerationUsage | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: GenerationUsage | None = None


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # each task adds its limits (dimensions, labels, context)
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: Task
    precision: str | None
    device: str | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelInfo]


class ErrorDetail(BaseModel):
    type: ErrorType
    message: str
    param: str | None


class ErrorBody(BaseModel):
    """Every error, on every route: the OpenAI shape."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


class NerRequest(BaseModel):
    """POST /ner (native): entities as Transformers' token-classification pipeline finds them."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] = Field(description="Texts of any length: one over the model's token limit "
                                                "is read in overlapping windows.")
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple", description="As the pipeline's: none (a result per token), simple (adjacent tokens of one type "
        "grouped), first, average or max (grouped, and a word never split between types: the label of its first "
        "token, of its tokens' average scores, or of its surest token). The pipeline's default is none."
    )
    ignore_labels: list[StrictStr] = Field(["O"], description="Labels (or, grouped, types) left out of the answer.")
    model: StrictStr | None = None


class TokenEntity(BaseModel):
    """A token, with aggregation_strategy none."""

    entity: str
    score: float
    index: int = Field(description="The token's position in the text's encoding, special tokens counted.")
    word: str = Field(description="The token as the vocabulary spells it; text[start:end] is the text itself.")
    start: int
    end: int


class EntityGroup(BaseModel):
    """Adjacent tokens (or words) of one type, grouped."""

    entity_group: str
    score: float = Field(description="The mean score of its tokens (or words).")
    word: str = Field(description="Its tokens joined as the tokenizer decodes them; text[start:end] is the text itself.")
    start: int
    end: int


class NerResponse(BaseModel):
    model: str
    results: list[list[EntityGroup | TokenEntity]] = Field(description="Per text, its entities in the text's order.")
    windows: list[int] = Field(description="Per text, the windows of the model's token limit it was read in (1: whole).")
    usage: Usage = Field(description="The tokens the model read, the windows' overlaps included.")

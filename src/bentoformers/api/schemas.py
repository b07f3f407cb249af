"""Request and answer bodies of the public routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    RootModel,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from bentoformers.errors import ErrorType
from bentoformers.tasks import Task

# Which end of a text over the limit is cut: "right" keeps its start, "left" its end (TEI spells them Right, Left).
TruncationDirection = Literal["right", "left", "Right", "Left"]
PROMPT_NAME = Field(None, description="One of the model's prompts (GET /v1/models), put before each text; "
                    "absent: the model's default prompt, if it has one.")
DIMENSIONS = Field(None, ge=1, description="Cut each vector to its first `dimensions` values and L2-normalise it: "
                   "the model's full size, or one of its Matryoshka sizes (GET /v1/models).")
TRUNCATION_DIRECTION = Field("right", description="With truncate: right keeps each text's first tokens, left its last.")
# Every list a request may send is bounded here, above the routes' own limits (max_items_per_request, ...), and
# stops at its first wrong item (fail_fast): a body of a million wrong items costs one error, not a million.
MAX_LIST_ITEMS = 65_536
MAX_IGNORE_LABELS = 1024


def bounded(item: Any, max_length: int = MAX_LIST_ITEMS, min_length: int = 0) -> Any:
    return Annotated[list[item], Field(min_length=min_length, max_length=max_length, fail_fast=True)]


Texts = bounded(StrictStr)


# The output types of an embedding (Cohere's `embedding_types`): float; base64 of little-endian float32 values;
# int8/uint8 with the ranges calibrated at build (as sentence-transformers' quantize_embeddings); binary/ubinary,
# one bit per value (> 0), eight to a byte, as int8 (the byte - 128) or uint8.
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
EmbeddingTypes = Annotated[list[EmbeddingType], Field(min_length=1, max_length=6, fail_fast=True)]
CohereTruncate = Literal["NONE", "START", "END"]
INPUT_TYPE = Field(
    None, description="As Voyage, Cohere and NVIDIA NIM take it: query or search_query picks the model's query "
    "prompt; document, passage or search_document its document prompt; classification or clustering the prompt "
    "of that name; or a prompt's name. A model without such a prompt embeds the text as it is.",
)
EMBEDDING_TYPES = Field(None, description="Cohere's output types; the answer's `embeddings` is then an object "
                        "keyed by type. The quantized types a model offers: GET /v1/models `embedding_types`.")


def _embed_truncate(value: Any) -> bool | str:
    # One check, so that a wrong value is reported as `truncate` (a union would name its branches).
    if isinstance(value, bool) or (isinstance(value, str) and value in ("NONE", "START", "END")):
        return value
    raise ValueError("truncate is true, false, or one of END, START, NONE")


EmbedTruncate = Annotated[
    bool | str,
    PlainValidator(_embed_truncate),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"enum": ["NONE", "START", "END"], "type": "string"}]}),
]


class EmbedRequest(BaseModel):
    """POST /embed (native)."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | Texts
    normalize: StrictBool | None = Field(None, description="Default: as the model was trained.")
    truncate: EmbedTruncate = Field(
        False, description="Cut texts over the model's token limit instead of refusing them; or Cohere's END "
        "(= true, right), START (= true, left), NONE (= false).")
    model: StrictStr | None = None
    prompt_name: StrictStr | None = PROMPT_NAME
    prompt: StrictStr | None = Field(None, description="Text put before each text, in place of a named prompt; "
                                     '"" for none (not even the default).')
    dimensions: StrictInt | None = DIMENSIONS
    output_dimension: StrictInt | None = Field(None, ge=1, description="Cohere's name for `dimensions`.")
    truncation_direction: TruncationDirection = TRUNCATION_DIRECTION
    input_type: StrictStr | None = INPUT_TYPE
    embedding_types: EmbeddingTypes | None = EMBEDDING_TYPES


class OpenAIEmbeddingRequest(BaseModel):
    """POST /v1/embeddings, as the OpenAI API defines it (extra fields such as `user` are ignored)."""

    model_config = ConfigDict(extra="ignore")
    input: StrictStr | Texts
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = DIMENSIONS
    truncate: StrictBool = False
    input_type: StrictStr | None = INPUT_TYPE
    prompt_name: StrictStr | None = PROMPT_NAME
    truncation_direction: TruncationDirection = TRUNCATION_DIRECTION


class CohereContent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: StrictStr | None = None


class CohereInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: bounded(CohereContent, min_length=1)


class CohereEmbedRequest(BaseModel):
    """POST /v2/embed, as Cohere's API v2 defines it (`priority` and other extra fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    texts: Texts | None = None
    inputs: bounded(CohereInput) | None = Field(None, description="Items of one text each (no images).")
    images: bounded(Any) | None = Field(None, description="Not supported: a 400.")
    model: StrictStr | None = None
    input_type: StrictStr | None = INPUT_TYPE
    embedding_types: EmbeddingTypes = ["float"]
    output_dimension: StrictInt | None = Field(None, ge=1, description="As `dimensions` on /embed.")
    max_tokens: StrictInt | None = Field(None, ge=1, description="Not supported: a 400 (use truncate).")
    truncate: CohereTruncate = Field("END", description="END cuts a text's end, START its start, NONE refuses a "
                                     "text over the model's token limit (413).")


class TokenizeRequest(BaseModel):
    """POST /tokenize (TEI's shape): the tokens a model sees, without running it."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | Texts
    add_special_tokens: StrictBool = True
    prompt_name: StrictStr | None = Field(None, description="As on /embed: the prompt's tokens come first, marked "
                                          "`prompt`; absent: an embeddings model's default prompt, if any.")
    prompt: StrictStr | None = Field(None, description='As on /embed: a text put before each input; "" for none.')
    model: StrictStr | None = Field(None, description="Any served model; absent: the default.")


MAX_CANDIDATE_LABELS = 64


class ClassifyRequest(BaseModel):
    """POST /classify (native). With `candidate_labels`, zero-shot classification on an NLI model: each text
    is the premise, and each label in the template the hypothesis, as Transformers' zero-shot pipeline does."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | Texts
    top_k: StrictInt | None = Field(None, ge=1, description="Labels per text, best first; null or absent: all labels.")
    truncate: StrictBool = Field(False, description="Cut texts over the model's token limit instead of refusing them.")
    model: StrictStr | None = None
    candidate_labels: bounded(StrictStr, MAX_CANDIDATE_LABELS, min_length=1) | None = Field(
        None,
        description="Zero-shot: the labels to score, on a model served as zero-shot (an NLI model).",
    )
    hypothesis_template: StrictStr = Field(
        "This example is {}.", description="Zero-shot: the hypothesis for a label, which replaces its one {}."
    )
    multi_label: StrictBool = Field(
        False, description="Zero-shot: score each label on its own (entailment against contradiction) instead of "
        "the labels against each other.",
    )


Stop = StrictStr | Texts | None
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
    prompt: StrictStr | Texts
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
    content: StrictStr | bounded(TextPart)
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions, as the OpenAI API defines it (`user`, `metadata`, `store` etc. ignored;
    fields this server cannot honour are refused by name: api/chat.py)."""

    model_config = ConfigDict(extra="ignore")
    messages: bounded(ChatMessage, min_length=1)
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


class EmbeddingsByType(BaseModel):
    """Per requested type, a row per text."""

    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = Field(None, description="Little-endian float32 values, base64.")


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]] | EmbeddingsByType = Field(description="With embedding_types: by type.")
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


class Token(BaseModel):
    id: int
    text: str = Field(description="The token's surface in the input (a special token: its own text).")
    special: bool
    start: int | None = Field(description="Character offset into the input where the token starts; null for a "
                              "special token or one of the prompt's.")
    stop: int | None = Field(description="Character offset just past its end.")
    prompt: bool = Field(description="A token of the prompt put before the input.")


class TokenizeResponse(RootModel[list[list[Token]]]):
    """Per input, its tokens in order."""


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


# Rerank (api/rerank.py). A document's relevance score is the sigmoid of the model's logit for the pair.


class RerankRequest(BaseModel):
    """POST /rerank, as Hugging Face's text-embeddings-inference (TEI) defines it; `model` is ours."""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr
    texts: Texts
    raw_scores: StrictBool = Field(False, description="The model's logit instead of its sigmoid.")
    return_text: StrictBool = Field(False, description="Each result with its text.")
    truncate: StrictBool = Field(False, description="Cut pairs over the model's token limit instead of refusing them.")
    truncation_direction: Literal["Right", "Left"] = Field(
        "Right", description="Only Right (the end of the longer text is cut) is supported."
    )
    model: StrictStr | None = None


class RerankDocument(BaseModel):
    text: str


# Cohere and Jina take a document as a string or as {"text": ...}.
_DOCUMENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"text": {"type": "string"}},
                                                   "required": ["text"]}]}


class CohereRerankRequest(BaseModel):
    """POST /v1/rerank (Cohere v1 and Jina) and POST /v2/rerank (Cohere v2). Fields this server cannot honour
    are refused by name (api/rerank.py); others, such as Cohere's `priority`, are ignored."""

    model_config = ConfigDict(extra="ignore")
    query: StrictStr
    documents: Texts = Field(json_schema_extra={"items": _DOCUMENT_SCHEMA})
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(None, ge=1, description="The best n results; absent, or more than the documents: all.")
    return_documents: StrictBool | None = Field(
        None, description="Each result with its document. Default: true on /v1/rerank (as Jina), false on /v2/rerank "
        "(as Cohere v2)."
    )
    max_tokens_per_doc: StrictInt | None = Field(None, ge=1, description="Cut each document to its first n tokens.")
    truncate: StrictBool = Field(False, description="Cut pairs over the model's token limit instead of refusing them.")

    @field_validator("documents", mode="before")
    @classmethod
    def _text_of_objects(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) <= MAX_LIST_ITEMS:  # longer: refused as it is
            return [v["text"] if isinstance(v, dict) and "text" in v else v for v in value]
        return value


class RerankResult(BaseModel):
    """One text of /rerank's answer, a JSON list sorted best first."""

    index: int
    score: float
    text: str | None = None


class RerankResponse(RootModel[list[RerankResult]]):
    pass


class RankedDocument(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class ApiVersion(BaseModel):
    version: Literal["1", "2"]


class BilledUnits(BaseModel):
    search_units: int = Field(description="One per query and 100 documents, as Cohere counts them.")


class MetaTokens(BaseModel):
    input_tokens: int


class RerankMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: MetaTokens


class CohereRerankResponse(BaseModel):
    """Cohere's answer (`id`, `results`, `meta`) with Jina's `model` and `usage` beside it."""

    id: str
    model: str
    results: list[RankedDocument] = Field(description="Best first.")
    meta: RerankMeta
    usage: Usage


class NerRequest(BaseModel):
    """POST /ner (native): entities as Transformers' token-classification pipeline finds them."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | Texts = Field(description="Texts of any length: one over the model's token limit "
                                                "is read in overlapping windows.")
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple", description="As the pipeline's: none (a result per token), simple (adjacent tokens of one type "
        "grouped), first, average or max (grouped, and a word never split between types: the label of its first "
        "token, of its tokens' average scores, or of its surest token). The pipeline's default is none."
    )
    ignore_labels: bounded(StrictStr, MAX_IGNORE_LABELS) = Field(
        ["O"], description="Labels (or, grouped, types) left out of the answer."
    )
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


# Cohere embed (api/embeddings.py).


class EmbedBilledUnits(BaseModel):
    input_tokens: int


class EmbedMeta(BaseModel):
    api_version: ApiVersion
    billed_units: EmbedBilledUnits
    tokens: MetaTokens


class CohereEmbedResponse(BaseModel):
    id: str
    response_type: Literal["embeddings_by_type"]
    embeddings: EmbeddingsByType
    texts: list[str]
    meta: EmbedMeta


# Sparse embeddings (api/sparse.py).


class EmbedSparseRequest(BaseModel):
    """POST /embed_sparse, as text-embeddings-inference defines it; `model` and `top_k` are ours."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | Texts
    truncate: StrictBool = Field(False, description="Cut texts over the model's token limit instead of refusing them.")
    truncation_direction: TruncationDirection = TRUNCATION_DIRECTION
    prompt_name: StrictStr | None = PROMPT_NAME
    top_k: StrictInt | None = Field(None, ge=1, description="Keep each text's k largest weights (ties to the lower "
                                    "index), still listed by index; absent: every non-zero weight.")
    model: StrictStr | None = None


class SparseValue(BaseModel):
    index: int = Field(description="The term's token id in the model's vocabulary.")
    value: float


class EmbedSparseResponse(RootModel[list[list[SparseValue]]]):
    """Per text, its non-zero weights in ascending index order."""

"""Python client for a bentoformers server: `Client` (sync) and `AsyncClient`, on httpx and pydantic only.

    from bentoformers import Client

    with Client("http://localhost:3000", api_key="...") as client:
        vectors = client.embed(["a text", "another"]).embeddings

Retries: 429, 503 and failed connections are retried with exponential backoff and full jitter, waiting at
least the server's `Retry-After`, for at most `max_retries` retries and `retry_timeout` seconds in all; a
request that timed out while the server was working on it is not retried (that would only add load).
Long lists are split into server-sized requests (the server's `max_items_per_request`, read once from
`GET /v1/models`) and the answers joined, so any length works.

Exceptions (the server's `type`, `message` and `param` are kept on every status error):

    BentoformersError
    ├── APIStatusError              .status_code .type .message .param .request_id .body
    │   ├── BadRequestError             400, 422 (and any other 4xx without a class of its own)
    │   │   └── RequestTooLargeError    413
    │   ├── AuthenticationError         401
    │   ├── PermissionDeniedError       403
    │   ├── NotFoundError               404
    │   ├── RateLimitError              429  .retry_after
    │   ├── OverloadedError             503  .retry_after
    │   └── ServerError                 500 and other 5xx
    └── APIConnectionError          the server could not be reached, or the connection broke
        └── APITimeoutError         no answer within the timeout
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

from bentoformers._version import __version__

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "BentoformersError",
    "ChatChunk",
    "ChatCompletion",
    "Classification",
    "Client",
    "Embeddings",
    "Entities",
    "Entity",
    "Generation",
    "GenerationChunk",
    "Label",
    "ModelInfo",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "RerankResult",
    "ServerError",
    "Token",
    "Usage",
]

DEFAULT_URL = "http://localhost:3000"
DEFAULT_MAX_ITEMS = 256  # the server's default max_items_per_request, used when it does not say
RETRY_STATUSES = frozenset({429, 503})


# ---- results ---------------------------------------------------------------------------------------------


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class _Answer(_Result):
    # The server's Server-Timing header: milliseconds per stage (queue, tokenize, inference, total, ...); summed
    # over the requests when one call was split into several.
    server_timing: dict[str, float] = {}


class Usage(_Result):
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    total_tokens: int = 0


class Embeddings(_Answer):
    model: str
    # With embedding_types: per type a row per text (float, int8, uint8, binary, ubinary: numbers; base64: str).
    embeddings: list[list[float]] | dict[str, list[list[float]] | list[str]]
    usage: Usage


class Token(_Result):
    id: int
    text: str
    special: bool
    start: int | None  # character offsets into the input; None for a special token or one of the prompt's
    stop: int | None
    prompt: bool = False  # a token of the prompt put before the input


class Label(_Result):
    label: str
    score: float


class Classification(_Answer):
    model: str
    results: list[list[Label]]  # per input, sorted by score, highest first
    usage: Usage


class SparseValue(_Result):
    index: int  # the term's token id in the model's vocabulary
    value: float


class RerankResult(_Result):
    index: int  # the document's position in the request
    score: float  # the sigmoid of the model's logit for the pair, or the logit with raw_scores
    text: str | None = None  # with return_text


class Entity(_Result):
    """An entity, with the keys of Transformers' token-classification pipeline: `entity_group` when grouped;
    per token (aggregation "none"), `entity` and `index` instead. `text[start:end]` is the entity's text."""

    entity_group: str | None = None
    entity: str | None = None
    score: float
    index: int | None = None
    word: str
    start: int
    end: int


class Entities(_Answer):
    model: str
    results: list[list[Entity]]  # per input, in the text's order
    windows: list[int]  # per input: the windows of the model's token limit it was read in (1: whole)
    usage: Usage


class Generation(_Answer):
    model: str
    text: str
    finish_reason: str  # "stop" or "length"
    usage: Usage


class GenerationChunk(_Result):
    text: str
    finish_reason: str | None = None  # set on the last chunk only
    usage: Usage | None = None  # set on the last chunk only


class ChatMessage(_Result):
    role: str
    content: str


class ChatChoice(_Result):
    index: int
    message: ChatMessage
    finish_reason: str  # "stop" or "length"


class ChatCompletion(_Answer):
    """`/v1/chat/completions`' answer; `text` is the first choice's content."""

    id: str
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].message.content


class ChatChunk(_Result):
    index: int = 0  # the choice
    text: str = ""
    finish_reason: str | None = None  # set on each choice's last chunk
    usage: Usage | None = None  # set on the stream's last chunk only


class ModelInfo(_Result):
    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    task: str | None = None
    precision: str | None = None
    device: str | None = None
    cpu: str | None = None  # the serving CPU's instruction-set class
    refused_variants: list[dict[str, str]] = []  # variants whose start-up check failed on that CPU
    # embeddings: the sizes `dimensions` may ask for (a Matryoshka model), the prompts `prompt_name` may name
    matryoshka_dimensions: list[int] = []
    prompts: dict[str, str] = {}
    default_prompt_name: str | None = None


# ---- errors ----------------------------------------------------------------------------------------------


class BentoformersError(Exception):
    """Base of every error this client raises."""


class APIStatusError(BentoformersError):
    """The server answered with an error status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
        server_timing: dict[str, float] | None = None,
    ) -> None:
        detail = f"{status_code} {type}: {message}" if type else f"{status_code}: {message}"
        super().__init__(detail + (f" (param: {param})" if param else ""))
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body
        self.server_timing = server_timing or {}  # the answer's Server-Timing, as on results


class BadRequestError(APIStatusError):
    """The request was refused as it stands (400/422); the message says what to change."""


class RequestTooLargeError(BadRequestError):
    """Over a documented limit (413): too many items, or a text over the model's token limit."""


class AuthenticationError(APIStatusError):
    """401: no credentials, or not valid ones."""


class PermissionDeniedError(APIStatusError):
    """403: valid credentials without the scope for this task."""


class NotFoundError(APIStatusError):
    """404: unknown model or route."""


class RateLimitError(APIStatusError):
    """429: over this client's request or token budget; `retry_after` says when to come back."""


class OverloadedError(APIStatusError):
    """503: the server's queue is full or the model service is unavailable; `retry_after` as sent."""


class ServerError(APIStatusError):
    """500 and other 5xx."""


class APIConnectionError(BentoformersError):
    """The server could not be reached, or the connection broke before an answer."""


class APITimeoutError(APIConnectionError):
    """No answer within the client's timeout."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: RequestTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    503: OverloadedError,
}
# For errors sent inside a stream, after the 200 status went out: only the type says what happened.
_BY_TYPE: dict[str, type[APIStatusError]] = {
    "invalid_request_error": BadRequestError,
    "validation_error": BadRequestError,
    "request_too_large": RequestTooLargeError,
    "authentication_error": AuthenticationError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "rate_limit_error": RateLimitError,
    "overloaded_error": OverloadedError,
    "server_error": ServerError,
}


def parse_retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (its delay-seconds or HTTP-date form); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the HTTP-date form
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_fields(body: Any) -> tuple[str | None, str | None, str | None]:
    """(type, message, param) from our body, BentoML's bare {"error": "..."} or its [{"error": ...}] list."""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return None, None, None
    error = body.get("error", body.get("detail"))
    if isinstance(error, dict):
        return error.get("type"), error.get("message"), error.get("param")
    return None, None if error is None else str(error), None


def server_timing(header: str | None) -> dict[str, float]:
    """`Server-Timing: queue;dur=0.12, inference;dur=4.5` as {"queue": 0.12, "inference": 4.5} (milliseconds)."""
    stages: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if name and key.strip() == "dur":
                try:
                    stages[name] = float(value)
                except ValueError:
                    pass
    return stages


def _answer(response: httpx.Response) -> Any:
    """The answer's JSON, an object with its Server-Timing under "server_timing"."""
    data = response.json()
    if isinstance(data, dict):
        data["server_timing"] = server_timing(response.headers.get("server-timing"))
    return data


def _sum_timing(parts: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for name, ms in part.items():
            total[name] = total.get(name, 0.0) + ms
    return total


def error_from_response(response: httpx.Response) -> APIStatusError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    kind, message, param = _error_fields(body)
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else BadRequestError)
    return cls(
        status,
        message or (body if isinstance(body, str) and body else response.reason_phrase),
        type=kind,
        param=param,
        request_id=response.headers.get("x-request-id"),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        body=body,
        server_timing=server_timing(response.headers.get("server-timing")),
    )


def _stream_error(error: Any, response: httpx.Response) -> APIStatusError:
    """An error event after the stream started: the status (200) was already sent, so the type decides."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    kind = error.get("type")
    cls = _BY_TYPE.get(kind or "", ServerError)
    return cls(
        response.status_code,
        error.get("message") or "error in stream",
        type=kind,
        param=error.get("param"),
        request_id=response.headers.get("x-request-id"),
        body=error,
    )


def _transport_error(exc: httpx.TransportError) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"no answer in time: {exc!r}")
    return APIConnectionError(f"could not reach the server: {exc!r}")


def _retryable_transport_error(exc: httpx.TransportError) -> bool:
    # The request never reached the server (or the connection was dropped): safe to send again.
    # A read timeout means the server was working on it; sending it again only adds load.
    return not isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout))


# ---- shared request logic ----------------------------------------------------------------------------


R = TypeVar("R", bound=BaseModel)


class _Base:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        retry_timeout: float,
        max_items_per_request: int | None,
        headers: dict[str, str] | None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("BENTOFORMERS_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("BENTOFORMERS_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_timeout = retry_timeout
        self._max_items = max_items_per_request
        self.headers = {"User-Agent": f"bentoformers-python/{__version__}", **(headers or {})}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def _delay(self, attempt: int, started: float, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number `attempt` (1-based), or None to give up."""
        if attempt > self.max_retries:
            return None
        delay = random.uniform(0, min(8.0, 0.25 * 2**attempt))  # full jitter
        if retry_after is not None:
            delay = retry_after + random.uniform(0, 0.1 * retry_after + 0.05)
        if time.monotonic() - started + delay > self.retry_timeout:
            return None
        return delay

    @staticmethod
    def _items(inputs: str | Sequence[str]) -> list[str]:
        if isinstance(inputs, str):
            return [inputs]
        items = list(inputs)
        if not items:
            raise ValueError("inputs must hold at least one text")
        return items

    @staticmethod
    def _chat_body(messages: str | Sequence[dict[str, Any]], options: dict[str, Any], stream: bool) -> dict[str, Any]:
        turns = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        options = {k: v for k, v in options.items() if v is not None}
        if "max_tokens" in options:
            options["max_completion_tokens"] = options.pop("max_tokens")
        body = {"messages": turns, **options}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    @staticmethod
    def _options(**kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in kwargs.items() if v is not None}

    @staticmethod
    def _max_items_from(models: list[ModelInfo]) -> int:
        for m in models:
            limit = (m.model_extra or {}).get("max_items_per_request")
            if isinstance(limit, int) and limit > 0:
                return limit
        return DEFAULT_MAX_ITEMS

    @staticmethod
    def _join_embeddings(parts: list[Embeddings]) -> Embeddings:
        if len(parts) == 1:
            return parts[0]
        first = parts[0].embeddings
        return Embeddings(
            model=parts[0].model,
            embeddings={k: [v for p in parts for v in p.embeddings[k]] for k in first} if isinstance(first, dict)
            else [v for p in parts for v in p.embeddings],
            usage=_sum_usage([p.usage for p in parts]),
            server_timing=_sum_timing([p.server_timing for p in parts]),
        )

    @staticmethod
    def _join_classifications(parts: list[Classification]) -> Classification:
        if len(parts) == 1:
            return parts[0]
        return Classification(
            model=parts[0].model,
            results=[r for p in parts for r in p.results],
            usage=_sum_usage([p.usage for p in parts]),
            server_timing=_sum_timing([p.server_timing for p in parts]),
        )

    @staticmethod
    def _rerank_options(raw_scores: bool, return_text: bool, truncate: bool | None, model: str | None) -> dict[str, Any]:
        return _Base._options(raw_scores=raw_scores or None, return_text=return_text or None, truncate=truncate,
                              model=model)

    @staticmethod
    def _join_rankings(parts: list[list[dict[str, Any]]], top_n: int | None) -> list[RerankResult]:
        if top_n is not None and top_n < 1:
            raise ValueError("top_n must be at least 1")
        # A document's score does not depend on the others sent with it: the parts merge exactly.
        results, offset = [], 0
        for part in parts:
            results += [RerankResult.model_validate(r | {"index": r["index"] + offset}) for r in part]
            offset += len(part)
        if len(parts) > 1:
            results.sort(key=lambda r: (-r.score, r.index))
        return results[:top_n]

    @staticmethod
    def _join_entities(parts: list[Entities]) -> Entities:
        if len(parts) == 1:
            return parts[0]
        return Entities(
            model=parts[0].model,
            results=[r for p in parts for r in p.results],
            windows=[w for p in parts for w in p.windows],
            usage=_sum_usage([p.usage for p in parts]),
            server_timing=_sum_timing([p.server_timing for p in parts]),
        )


def _sum_usage(usages: list[Usage]) -> Usage:
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        total_tokens=sum(u.total_tokens for u in usages),
    )


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _sse_data(line: str) -> str | None:
    return line[5:].strip() if line.startswith("data:") else None


class _ChatChunker:
    """chat.completion.chunk events -> ChatChunk: content deltas as they come, each choice's finish, and the
    usage on the last chunk (the finish held back until the usage event that follows it)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response, self.held = response, None

    def feed(self, data: str) -> list[ChatChunk]:
        event = json.loads(data)
        if "error" in event:
            raise _stream_error(event["error"], self.response)
        out, held = [], self.held
        if not event.get("choices"):
            self.held = None
            usage = Usage.model_validate(event["usage"]) if event.get("usage") else None
            return [held.model_copy(update={"usage": usage})] if held else [ChatChunk(usage=usage)]
        if held is not None:
            out.append(held)
            self.held = None
        for choice in event["choices"]:
            chunk = ChatChunk(index=choice["index"], text=choice.get("delta", {}).get("content") or "",
                              finish_reason=choice.get("finish_reason"))
            if chunk.finish_reason is not None:
                self.held = chunk
            elif chunk.text:
                out.append(chunk)
        return out

    def end(self) -> list[ChatChunk]:
        return [self.held] if self.held is not None else []


# ---- sync ------------------------------------------------------------------------------------------------


class Client(_Base):
    """Blocking client. Pass `http_client` (e.g. Starlette's TestClient) or `transport` to run it elsewhere."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 5,
        retry_timeout: float = 60.0,
        max_items_per_request: int | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry_timeout, max_items_per_request, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def embed(
        self,
        inputs: str | Sequence[str],
        *,
        normalize: bool | None = None,
        truncate: bool | None = None,
        model: str | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        truncation_direction: str | None = None,
        input_type: str | None = None,
        embedding_types: Sequence[str] | None = None,
    ) -> Embeddings:
        """Vectors for the texts, in order; `normalize` defaults to how the model was trained. `prompt_name`
        (one of the model's prompts) or `prompt` (any text; "" for none) goes before each text, `dimensions`
        cuts a Matryoshka model's vectors (then normalised), `truncation_direction` "left" keeps the ends.
        `input_type` (search_query, search_document, classification, clustering) picks the model's prompt for it;
        `embedding_types` (float, int8, uint8, binary, ubinary, base64: those the model offers, GET /v1/models)
        makes `embeddings` a dict by type."""
        options = self._options(normalize=normalize, truncate=truncate, model=model, prompt_name=prompt_name,
                                prompt=prompt, dimensions=dimensions, truncation_direction=truncation_direction,
                                input_type=input_type,
                                embedding_types=None if embedding_types is None else list(embedding_types))
        parts = [
            Embeddings.model_validate(self._post("/embed", {"inputs": chunk, **options}))
            for chunk in self._split(self._items(inputs))
        ]
        return self._join_embeddings(parts)

    def tokenize(
        self,
        inputs: str | Sequence[str],
        *,
        add_special_tokens: bool | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        model: str | None = None,
    ) -> list[list[Token]]:
        """Per text, the tokens the model sees (`POST /tokenize`), with character offsets into the text."""
        options = self._options(add_special_tokens=add_special_tokens, prompt_name=prompt_name, prompt=prompt,
                                model=model)
        return self._per_text("/tokenize", inputs, options, Token)

    def classify(
        self,
        inputs: str | Sequence[str],
        *,
        top_k: int | None = None,
        all_labels: bool = False,
        truncate: bool | None = None,
        model: str | None = None,
        candidate_labels: Sequence[str] | None = None,
        hypothesis_template: str | None = None,
        multi_label: bool | None = None,
    ) -> Classification:
        """Labels with scores per text, best first: the server's default count, `top_k`, or `all_labels`. With
        `candidate_labels`, zero-shot on an NLI model: the labels you name (`hypothesis_template`, `multi_label`)."""
        options = self._options(
            top_k=top_k, truncate=truncate, model=model, hypothesis_template=hypothesis_template,
            multi_label=multi_label, candidate_labels=None if candidate_labels is None else list(candidate_labels),
        )
        if all_labels:
            options["top_k"] = None
        pairs_per_text = 1 if candidate_labels is None else max(1, len(candidate_labels))
        parts = [
            Classification.model_validate(self._post("/classify", {"inputs": chunk, **options}))
            for chunk in self._split(self._items(inputs), pairs_per_text)
        ]
        return self._join_classifications(parts)

    def rerank(
        self,
        query: str,
        documents: str | Sequence[str],
        *,
        top_n: int | None = None,
        raw_scores: bool = False,
        return_text: bool = False,
        truncate: bool | None = None,
        model: str | None = None,
    ) -> list[RerankResult]:
        """The documents by relevance to `query`, best first (the `top_n` best): each one's index and score
        (the sigmoid of the model's logit; the logit with `raw_scores`), and its text with `return_text`."""
        options = self._rerank_options(raw_scores, return_text, truncate, model)
        parts = [self._post("/rerank", {"query": query, "texts": chunk, **options})
                 for chunk in self._split(self._items(documents))]
        return self._join_rankings(parts, top_n)

    def embed_sparse(
        self,
        inputs: str | Sequence[str],
        *,
        top_k: int | None = None,
        truncate: bool | None = None,
        truncation_direction: str | None = None,
        model: str | None = None,
    ) -> list[list[SparseValue]]:
        """Per text, its SPLADE weights (`POST /embed_sparse`): the non-zero ones by ascending token id, or with
        `top_k` its k largest."""
        options = self._options(top_k=top_k, truncate=truncate, truncation_direction=truncation_direction, model=model)
        return self._per_text("/embed_sparse", inputs, options, SparseValue)

    def ner(
        self,
        inputs: str | Sequence[str],
        *,
        aggregation_strategy: str | None = None,
        ignore_labels: Sequence[str] | None = None,
        model: str | None = None,
    ) -> Entities:
        """Entities per text, with character offsets into it, as Transformers' token-classification pipeline
        finds them. `aggregation_strategy`: none, simple (the server's default), first, average or max;
        `ignore_labels` (default ["O"]). Texts of any length: a long one is read in windows (each counts
        against the server's `max_items_per_request`)."""
        options = self._options(aggregation_strategy=aggregation_strategy, model=model)
        if ignore_labels is not None:
            options["ignore_labels"] = list(ignore_labels)
        parts = [
            Entities.model_validate(self._post("/ner", {"inputs": chunk, **options}))
            for chunk in self._split(self._items(inputs))
        ]
        return self._join_entities(parts)

    def generate(self, prompt: str, **options: Any) -> Generation:
        """Complete `prompt`. Options: max_new_tokens, temperature (0 = greedy), top_p, top_k, stop, seed, model."""
        return Generation.model_validate(self._post("/generate", {"prompt": prompt, **self._options(**options)}))

    def generate_stream(self, prompt: str, **options: Any) -> Iterator[GenerationChunk]:
        """As `generate`, one chunk per token as it is made; the last chunk has `finish_reason` and `usage`."""
        body = {"prompt": prompt, **self._options(**options), "stream": True}
        response = self._send("POST", "/generate", body, stream=True)
        try:
            for line in response.iter_lines():
                data = _sse_data(line)
                if data is None or not data:
                    continue
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise _stream_error(event["error"], response)
                yield GenerationChunk.model_validate(event)
        except httpx.TransportError as exc:  # the connection broke mid-stream
            raise _transport_error(exc) from exc
        finally:
            response.close()

    def chat(self, messages: str | Sequence[dict[str, Any]], **options: Any) -> ChatCompletion:
        """The model's answer to a conversation (`/v1/chat/completions`), rendered with its chat template.
        `messages`: [{"role": "system" | "user" | "assistant", "content": ...}, ...], or one user message.
        Options: max_tokens, temperature (default 1; 0 = greedy), top_p, seed, stop, n, model."""
        return ChatCompletion.model_validate(self._post("/v1/chat/completions", self._chat_body(messages, options, False)))

    def chat_stream(self, messages: str | Sequence[dict[str, Any]], **options: Any) -> Iterator[ChatChunk]:
        """As `chat`, as the text is made: chunks with `index` (the choice) and `text`; each choice's last has
        its `finish_reason`, the stream's last the `usage`."""
        response = self._send("POST", "/v1/chat/completions", self._chat_body(messages, options, True), stream=True)
        chunker = _ChatChunker(response)
        try:
            for line in response.iter_lines():
                data = _sse_data(line)
                if not data:
                    continue
                if data == "[DONE]":
                    break
                yield from chunker.feed(data)
            yield from chunker.end()
        except httpx.TransportError as exc:  # the connection broke mid-stream
            raise _transport_error(exc) from exc
        finally:
            response.close()

    def models(self) -> list[ModelInfo]:
        """The served models (`GET /v1/models`)."""
        return [ModelInfo.model_validate(m) for m in self._send("GET", "/v1/models").json()["data"]]

    def max_items_per_request(self) -> int:
        """The server's limit on texts per request (asked once), unless given to the constructor."""
        if self._max_items is None:
            try:
                self._max_items = self._max_items_from(self.models())
            except NotFoundError:
                self._max_items = DEFAULT_MAX_ITEMS
        return self._max_items

    def _per_text(self, path: str, inputs: str | Sequence[str], options: dict[str, Any], item: type[R]) -> list[list[R]]:
        """A route that answers a list per text (/tokenize, /embed_sparse): the texts in requests the server takes,
        each text's list as `item`s."""
        return [
            [item.model_validate(value) for value in row]
            for chunk in self._split(self._items(inputs))
            for row in self._post(path, {"inputs": chunk, **options})
        ]

    def _split(self, items: list[str], sequences_per_item: int = 1) -> list[list[str]]:
        """Requests within the server's limit of sequences (a zero-shot text is one per label)."""
        return [items] if len(items) == 1 else _chunks(items, max(1, self.max_items_per_request() // sequences_per_item))

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _answer(self._send("POST", path, body))

    def _send(self, method: str, path: str, body: Any = None, stream: bool = False) -> Any:
        started, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            request = self._http.build_request(
                method, self.base_url + path, json=body, headers=self.headers, timeout=self.timeout
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._delay(attempt, started, None) if _retryable_transport_error(exc) else None
                if delay is None:
                    raise _transport_error(exc) from exc
                time.sleep(delay)
                continue
            if response.is_success:
                return response
            if stream:
                response.read()
                response.close()
            error = error_from_response(response)
            delay = self._delay(attempt, started, error.retry_after) if response.status_code in RETRY_STATUSES else None
            if delay is None:
                raise error
            time.sleep(delay)


# ---- async -----------------------------------------------------------------------------------------------


class AsyncClient(_Base):
    """As `Client`, for asyncio. `transport=httpx.ASGITransport(app)` runs it against an app in process."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 5,
        retry_timeout: float = 60.0,
        max_items_per_request: int | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry_timeout, max_items_per_request, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def embed(
        self,
        inputs: str | Sequence[str],
        *,
        normalize: bool | None = None,
        truncate: bool | None = None,
        model: str | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dimensions: int | None = None,
        truncation_direction: str | None = None,
        input_type: str | None = None,
        embedding_types: Sequence[str] | None = None,
    ) -> Embeddings:
        options = self._options(normalize=normalize, truncate=truncate, model=model, prompt_name=prompt_name,
                                prompt=prompt, dimensions=dimensions, truncation_direction=truncation_direction,
                                input_type=input_type,
                                embedding_types=None if embedding_types is None else list(embedding_types))
        parts = [
            Embeddings.model_validate(await self._post("/embed", {"inputs": chunk, **options}))
            for chunk in await self._split(self._items(inputs))
        ]
        return self._join_embeddings(parts)

    async def tokenize(
        self,
        inputs: str | Sequence[str],
        *,
        add_special_tokens: bool | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        model: str | None = None,
    ) -> list[list[Token]]:
        options = self._options(add_special_tokens=add_special_tokens, prompt_name=prompt_name, prompt=prompt,
                                model=model)
        return await self._per_text("/tokenize", inputs, options, Token)

    async def classify(
        self,
        inputs: str | Sequence[str],
        *,
        top_k: int | None = None,
        all_labels: bool = False,
        truncate: bool | None = None,
        model: str | None = None,
        candidate_labels: Sequence[str] | None = None,
        hypothesis_template: str | None = None,
        multi_label: bool | None = None,
    ) -> Classification:
        options = self._options(
            top_k=top_k, truncate=truncate, model=model, hypothesis_template=hypothesis_template,
            multi_label=multi_label, candidate_labels=None if candidate_labels is None else list(candidate_labels),
        )
        if all_labels:
            options["top_k"] = None
        pairs_per_text = 1 if candidate_labels is None else max(1, len(candidate_labels))
        parts = [
            Classification.model_validate(await self._post("/classify", {"inputs": chunk, **options}))
            for chunk in await self._split(self._items(inputs), pairs_per_text)
        ]
        return self._join_classifications(parts)

    async def rerank(
        self,
        query: str,
        documents: str | Sequence[str],
        *,
        top_n: int | None = None,
        raw_scores: bool = False,
        return_text: bool = False,
        truncate: bool | None = None,
        model: str | None = None,
    ) -> list[RerankResult]:
        options = self._rerank_options(raw_scores, return_text, truncate, model)
        parts = [await self._post("/rerank", {"query": query, "texts": chunk, **options})
                 for chunk in await self._split(self._items(documents))]
        return self._join_rankings(parts, top_n)

    async def embed_sparse(
        self,
        inputs: str | Sequence[str],
        *,
        top_k: int | None = None,
        truncate: bool | None = None,
        truncation_direction: str | None = None,
        model: str | None = None,
    ) -> list[list[SparseValue]]:
        options = self._options(top_k=top_k, truncate=truncate, truncation_direction=truncation_direction, model=model)
        return await self._per_text("/embed_sparse", inputs, options, SparseValue)

    async def ner(
        self,
        inputs: str | Sequence[str],
        *,
        aggregation_strategy: str | None = None,
        ignore_labels: Sequence[str] | None = None,
        model: str | None = None,
    ) -> Entities:
        options = self._options(aggregation_strategy=aggregation_strategy, model=model)
        if ignore_labels is not None:
            options["ignore_labels"] = list(ignore_labels)
        parts = [
            Entities.model_validate(await self._post("/ner", {"inputs": chunk, **options}))
            for chunk in await self._split(self._items(inputs))
        ]
        return self._join_entities(parts)

    async def generate(self, prompt: str, **options: Any) -> Generation:
        return Generation.model_validate(await self._post("/generate", {"prompt": prompt, **self._options(**options)}))

    async def generate_stream(self, prompt: str, **options: Any) -> AsyncIterator[GenerationChunk]:
        body = {"prompt": prompt, **self._options(**options), "stream": True}
        response = await self._send("POST", "/generate", body, stream=True)
        try:
            async for line in response.aiter_lines():
                data = _sse_data(line)
                if data is None or not data:
                    continue
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise _stream_error(event["error"], response)
                yield GenerationChunk.model_validate(event)
        except httpx.TransportError as exc:  # the connection broke mid-stream
            raise _transport_error(exc) from exc
        finally:
            await response.aclose()

    async def chat(self, messages: str | Sequence[dict[str, Any]], **options: Any) -> ChatCompletion:
        body = self._chat_body(messages, options, False)
        return ChatCompletion.model_validate(await self._post("/v1/chat/completions", body))

    async def chat_stream(self, messages: str | Sequence[dict[str, Any]], **options: Any) -> AsyncIterator[ChatChunk]:
        body = self._chat_body(messages, options, True)
        response = await self._send("POST", "/v1/chat/completions", body, stream=True)
        chunker = _ChatChunker(response)
        try:
            async for line in response.aiter_lines():
                data = _sse_data(line)
                if not data:
                    continue
                if data == "[DONE]":
                    break
                for chunk in chunker.feed(data):
                    yield chunk
            for chunk in chunker.end():
                yield chunk
        except httpx.TransportError as exc:  # the connection broke mid-stream
            raise _transport_error(exc) from exc
        finally:
            await response.aclose()

    async def models(self) -> list[ModelInfo]:
        response = await self._send("GET", "/v1/models")
        return [ModelInfo.model_validate(m) for m in response.json()["data"]]

    async def max_items_per_request(self) -> int:
        if self._max_items is None:
            try:
                self._max_items = self._max_items_from(await self.models())
            except NotFoundError:
                self._max_items = DEFAULT_MAX_ITEMS
        return self._max_items

    async def _per_text(
        self, path: str, inputs: str | Sequence[str], options: dict[str, Any], item: type[R]
    ) -> list[list[R]]:
        """As Client._per_text."""
        return [
            [item.model_validate(value) for value in row]
            for chunk in await self._split(self._items(inputs))
            for row in await self._post(path, {"inputs": chunk, **options})
        ]

    async def _split(self, items: list[str], sequences_per_item: int = 1) -> list[list[str]]:
        limit = await self.max_items_per_request()
        return [items] if len(items) == 1 else _chunks(items, max(1, limit // sequences_per_item))

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _answer(await self._send("POST", path, body))

    async def _send(self, method: str, path: str, body: Any = None, stream: bool = False) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            request = self._http.build_request(
                method, self.base_url + path, json=body, headers=self.headers, timeout=self.timeout
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._delay(attempt, started, None) if _retryable_transport_error(exc) else None
                if delay is None:
                    raise _transport_error(exc) from exc
                await asyncio.sleep(delay)
                continue
            if response.is_success:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            error = error_from_response(response)
            delay = self._delay(attempt, started, error.retry_after) if response.status_code in RETRY_STATUSES else None
            if delay is None:
                raise error
            await asyncio.sleep(delay)

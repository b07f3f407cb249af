"""The route table: every public route once, read by the app (routing), auth (scopes), metrics (labels), the
OpenAPI document and BentoML's client schema (api/openapi.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from bentoformers.api import schemas


@dataclass(frozen=True)
class RouteSpec:
    path: str
    method: str
    task: str | None  # the scope a caller needs; None: any valid identity
    handler: str  # the name of its handler in gateway.py
    request: type[BaseModel] | None = None  # the JSON body it takes
    response: type[BaseModel] | None = None  # its JSON answer
    # Its name as a method of BentoML's SyncHTTPClient/AsyncHTTPClient (`client.embed(inputs=[...])`), if any.
    client_method: str | None = None
    # The media type of a streamed answer: the only answer on a route without `response`, else the one
    # that `"stream": true` in the body asks for.
    stream: str | None = None
    summary: str = ""


SSE = "text/event-stream"

ROUTES = (
    RouteSpec("/embed", "POST", "embeddings", "embed", schemas.EmbedRequest, schemas.EmbedResponse, "embed",
              summary="Embed texts"),
    RouteSpec("/v1/embeddings", "POST", "embeddings", "openai_embeddings", schemas.OpenAIEmbeddingRequest,
              schemas.OpenAIEmbeddingResponse, summary="Embed texts (OpenAI)"),
    RouteSpec("/v2/embed", "POST", "embeddings", "cohere_embed", schemas.CohereEmbedRequest,
              schemas.CohereEmbedResponse, summary="Embed texts (Cohere v2)"),
    RouteSpec("/embed_sparse", "POST", "sparse-embeddings", "embed_sparse", schemas.EmbedSparseRequest,
              schemas.EmbedSparseResponse, "embed_sparse", summary="Sparse (SPLADE) embeddings of texts (TEI)"),
    RouteSpec("/tokenize", "POST", None, "tokenize", schemas.TokenizeRequest, schemas.TokenizeResponse, "tokenize",
              summary="Tokenize texts as a model would (runs no model; counts no tokens)"),
    RouteSpec("/classify", "POST", "classification", "classify", schemas.ClassifyRequest, schemas.ClassifyResponse,
              "classify", summary="Classify texts"),
    RouteSpec("/generate", "POST", "generation", "generate", schemas.GenerateRequest, schemas.GenerateResponse,
              stream=SSE, summary="Generate text, whole or as server-sent events"),
    RouteSpec("/generate/stream", "POST", "generation", "generate_text", schemas.GenerateTextRequest,
              client_method="generate", stream="text/plain", summary="Generate text as a stream of plain text"),
    RouteSpec("/v1/completions", "POST", "generation", "openai_completions", schemas.CompletionRequest,
              schemas.CompletionResponse, stream=SSE, summary="Complete a prompt (OpenAI)"),
    RouteSpec("/v1/chat/completions", "POST", "generation", "chat_completions", schemas.ChatCompletionRequest,
              schemas.ChatCompletionResponse, stream=SSE, summary="Chat (OpenAI)"),
    RouteSpec("/rerank", "POST", "rerank", "rerank", schemas.RerankRequest, schemas.RerankResponse, "rerank",
              summary="Rerank texts by relevance to a query (TEI)"),
    RouteSpec("/v1/rerank", "POST", "rerank", "rerank_v1", schemas.CohereRerankRequest, schemas.CohereRerankResponse,
              summary="Rerank documents (Cohere v1, Jina)"),
    RouteSpec("/v2/rerank", "POST", "rerank", "rerank_v2", schemas.CohereRerankRequest, schemas.CohereRerankResponse,
              summary="Rerank documents (Cohere v2)"),
    RouteSpec("/ner", "POST", "token-classification", "ner", schemas.NerRequest, schemas.NerResponse, "ner",
              summary="Find entities in texts (token classification)"),
    RouteSpec("/v1/models", "GET", None, "list_models", response=schemas.ModelList, summary="List the served models"),
)
# Route -> task (the scope it needs). Any other path needs a valid identity and no particular scope.
ROUTE_TASKS = {r.path: r.task for r in ROUTES if r.task}
# BentoML's probes and the scrape: never behind auth or the in-flight bound, logged only when they fail.
PROBE_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
# The descriptions of the API (OpenAPI, its rendering, BentoML's client schema): no credentials needed.
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js", "/schema.json"})
# The paths a request can be refused on before routing (by auth, rate limits, overload): they get their
# own metric label even then.
PUBLIC_PATHS = frozenset(r.path for r in ROUTES) | PROBE_PATHS | DOC_PATHS
# The methods each known path takes (HEAD too where it takes GET): a wrong one is a 405 in the one error body.
ALLOWED_METHODS = {path: frozenset({"GET", "HEAD"}) for path in PROBE_PATHS | DOC_PATHS} | {
    r.path: frozenset({r.method} | ({"HEAD"} if r.method == "GET" else set())) for r in ROUTES
}

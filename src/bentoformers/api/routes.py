"""The route table: every public route once, read by the app (routing), auth (scopes) and metrics (labels)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouteSpec:
    path: str
    method: str
    task: str | None  # the scope a caller needs; None: any valid identity
    handler: str  # the name of its handler in gateway.py


ROUTES = (
    RouteSpec("/embed", "POST", "embeddings", "embed"),
    RouteSpec("/v1/embeddings", "POST", "embeddings", "openai_embeddings"),
    RouteSpec("/classify", "POST", "classification", "classify"),
    RouteSpec("/generate", "POST", "generation", "generate"),
    RouteSpec("/v1/completions", "POST", "generation", "openai_completions"),
    RouteSpec("/v1/chat/completions", "POST", "generation", "chat_completions"),
    RouteSpec("/v1/models", "GET", None, "list_models"),
)
# Route -> task (the scope it needs). Any other path needs a valid identity and no particular scope.
ROUTE_TASKS = {r.path: r.task for r in ROUTES if r.task}
# BentoML's probes and the scrape: never behind auth or the in-flight bound, logged only when they fail.
PROBE_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
# The paths a request can be refused on before routing (by auth, rate limits, overload): they get their
# own metric label even then.
PUBLIC_PATHS = frozenset(r.path for r in ROUTES) | PROBE_PATHS

"""Who a caller is once their credentials check out: an id, the tasks they may call, their rate-limit tier."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("embeddings", "classification", "rerank", "token-classification", "generation", "sparse-embeddings")
ALL = "*"
DEFAULT_TIER = "default"
ANONYMOUS_TIER = "anonymous"


@dataclass(frozen=True)
class Identity:
    id: str  # key id, JWT subject, or the client address when anonymous; never a secret
    scopes: frozenset[str]
    tier: str
    kind: str  # "key" | "jwt" | "anonymous"

    @property
    def name(self) -> str:
        """The identity in its namespace (`key:alice`, `jwt:alice`, `anonymous:10.0.0.2`): a JWT subject that
        equals a key's id is another caller, in the logs and the rate limits."""
        return f"{self.kind}:{self.id}"

    def may(self, task: str) -> bool:
        return ALL in self.scopes or task in self.scopes

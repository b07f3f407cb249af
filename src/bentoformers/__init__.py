"""bentoformers: Hugging Face Transformers checkpoints to production BentoML services."""

from __future__ import annotations

from typing import Any

from bentoformers._version import __version__ as __version__

_CLIENT_NAMES = frozenset({
    "Client", "AsyncClient", "BentoformersError", "APIStatusError", "BadRequestError", "RequestTooLargeError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "RateLimitError", "OverloadedError",
    "ServerError", "APIConnectionError", "APITimeoutError",
})


def __getattr__(name: str) -> Any:
    # Imported on first use, so the server's processes do not load the client.
    if name in _CLIENT_NAMES:
        from bentoformers import client

        return getattr(client, name)
    raise AttributeError(f"module 'bentoformers' has no attribute {name!r}")

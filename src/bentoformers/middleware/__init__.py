"""ASGI middlewares, one per module: request id, access log, overload, auth, rate limits."""

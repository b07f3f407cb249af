"""Schemathesis hooks for tests/e2e/test_fuzz_openapi.py: the check that every error has the one body."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def one_error_body(ctx, response, case) -> None:
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == {"type", "message", "param"} and body["error"]["message"]):
        raise AssertionError(f"{response.status_code} without the one error body: {response.content[:300]!r}")
    return None

"""Schemathesis against the published OpenAPI document on a real `bentoml serve` (MiniLM, `sentiment`, `gpt2`):
every documented operation, with valid and invalid bodies. Zero 5xx, zero hangs, every answer as documented
(status, content type, headers, schema), every error in the one body. The counts print at the end (`-s`)."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

EXAMPLES = 60  # per operation
REQUEST_TIMEOUT = 30  # seconds: an answer slower than this is a hang
TALLY: Counter = Counter()


@pytest.fixture(scope="module")
def api_schema(server):
    yield schemathesis.openapi.from_url(f"{server}/openapi.json")
    print(f"\nschemathesis: {sum(TALLY.values())} requests; by status: {dict(sorted(TALLY.items()))}")


def one_error_body(ctx, response, case) -> None:
    if response.status_code < 400:
        return
    body = orjson.loads(response.content)
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation(case):
    response = case.call_and_validate(
        timeout=REQUEST_TIMEOUT,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_headers_conformance, response_schema_conformance, negative_data_rejection, one_error_body],
    )
    TALLY[response.status_code] += 1

"""The in-process tier: the real app (Gateway.to_asgi(), tests/conftest.py `app`) called through Starlette's
TestClient, one per module."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c

"""The real app in process, built once: BentoML registers its Prometheus metrics per app, so a second
`Gateway.to_asgi()` in the same process fails with DuplicateTimeseries."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def app(minilm_path):
    import service

    return service.Gateway.to_asgi()

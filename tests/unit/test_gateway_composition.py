"""The gateway's own shape: the BentoML layers it runs under, and how many worker processes it takes."""

from __future__ import annotations

import bentoml
import pytest
from _bentoml_impl.server.app import ServiceAppFactory

from bentoformers.serving import composition
from bentoformers.settings import Settings

BENTOML_PER_REQUEST_LAYERS = {"OpenTelemetryMiddleware", "TimeoutMiddleware", "ContextMiddleware"}


def _layers(service: bentoml.Service) -> list[str]:
    service.inject_config()
    return [layer.cls.__name__ for layer in ServiceAppFactory(service, is_main=True).middlewares]


def test_gateway_runs_under_its_own_layers_only_and_other_services_keep_bentomls():
    gateway = composition.compose(Settings(auth="disabled", model_process="gateway"), served=[])
    assert _layers(gateway) == [
        "AccessLogMiddleware", "TracingMiddleware", "RequestIdMiddleware", "ShutdownMiddleware", "AuthMiddleware", "BodyMiddleware",
        "OverloadMiddleware", "BentoRoutesMiddleware",
    ]

    @bentoml.service(name="another-service")
    class Another:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text

    assert BENTOML_PER_REQUEST_LAYERS <= set(_layers(Another))


@pytest.mark.parametrize(("process", "cores", "models", "workers"), [
    ("gateway", 2, 1, 1),  # the CPU default: the models share the gateway's process and its cores
    ("gateway", 64, 3, 1),
    ("separate", 2, 1, 1),
    ("separate", 16, 1, 15),  # a GPU box: HTTP and tokenizing take the cores the model service leaves
    ("separate", 16, 3, 13),
    ("separate", 2, 4, 1),
])
def test_gateway_workers_follow_where_the_models_run_and_the_usable_cores(monkeypatch, process, cores, models, workers):
    monkeypatch.setattr(composition, "usable_cores", lambda: cores)
    assert composition.gateway_workers(Settings(model_process=process), models) == workers


def test_gateway_workers_setting_wins():
    assert composition.gateway_workers(Settings(model_process="gateway", gateway_workers=3), 1) == 3

"""The whole service from the settings: one model service per served model, and the public `Gateway`.

The Gateway is a BentoML service around the Starlette app (api/), with a dependency on each model
service and the stored files of each model (card and tokenizer), under identifiers that
`StoredModel.attribute` spells so that no two model names can meet. Middlewares wrap it outermost first.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator

import bentoml

from bentoformers.api.app import create_app
from bentoformers.api.endpoint import ModelEndpoint
from bentoformers.api.gateway import Gateway as ModelChooser
from bentoformers.middleware.access_log import AccessLogMiddleware
from bentoformers.middleware.auth import AuthMiddleware
from bentoformers.middleware.bentoml_routes import BentoRoutesMiddleware
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.middleware.overload import OverloadMiddleware
from bentoformers.middleware.rate_limit import RateLimitMiddleware
from bentoformers.middleware.request_id import RequestIdMiddleware
from bentoformers.security.authenticator import Authenticator, startup_authenticator
from bentoformers.security.ratelimit import RateLimiter
from bentoformers.serving.model_services import SERVICE_CLASSES
from bentoformers.serving.store import StoredModel, check_attributes_unique, served_models
from bentoformers.settings import Settings


def compose(settings: Settings, served: list[StoredModel] | None = None) -> bentoml.Service:
    """The Gateway service of the served models (default: the built entries the settings select)."""
    served = served_models(settings) if served is None else served
    check_attributes_unique(served)
    # Refuses to start in a container with no credentials (BentoML's images set BENTOML_CONTAINERIZED=true).
    authenticator = startup_authenticator(
        settings, containerized=os.environ.get("BENTOML_CONTAINERIZED") == "true", announce=_announces()
    )
    app = create_app(secured=authenticator is not None, served={s.name: s.task for s in served})
    attrs: dict[str, object] = {"_served": served, "_settings": settings, "_asgi": app, "__module__": "service"}
    for stored in served:
        attrs[stored.attribute] = bentoml.depends(model_service(stored, settings))
        # The gateway reads each model's card and tokenizer from the stored files.
        attrs[stored.files_attribute] = bentoml.models.BentoModel(next(iter(stored.variants.values())))
    cls = type("Gateway", (_Gateway,), attrs)
    # BentoML's text access log is replaced by AccessLogMiddleware's JSON lines (and their CPU cost saved).
    gateway = bentoml.service(
        name="bentoformers", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}}
    )(bentoml.asgi_app(app, path="/")(cls))
    _add_middlewares(gateway, settings, authenticator)
    return gateway


def model_service(stored: StoredModel, settings: Settings) -> bentoml.Service:
    attrs: dict[str, object] = {"stored": stored, "settings": settings, "__module__": "service"}
    # Every stored variant is declared, so the bento and its image carry all of them.
    for precision, tag in stored.variants.items():
        attrs[f"model_{precision}"] = bentoml.models.BentoModel(tag)
    cls = type(stored.attribute, (SERVICE_CLASSES[stored.task],), attrs)
    # Internal service: its per-call access log would only repeat the gateway's, at a real CPU cost.
    return bentoml.service(
        name=f"model-{stored.name}", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}}
    )(cls)


class _Gateway:
    _served: list[StoredModel]
    _settings: Settings
    _asgi: object

    def __init__(self) -> None:
        endpoints = []
        for stored in self._served:
            service = getattr(self, stored.attribute)
            folder = getattr(self, stored.files_attribute).path
            call = stream = cancel = None
            if stored.task == "generation":
                stream, cancel = _streamer(service), _caller(service, "cancel")
            else:
                call = _caller(service, "embed" if stored.task == "embeddings" else "classify")
            endpoints.append(
                ModelEndpoint(
                    self._settings, folder, describe=_caller(service, "describe"), call=call, stream=stream,
                    cancel=cancel,
                )
            )
        self._asgi.state.gateway = ModelChooser(self._settings, endpoints)


def _caller(service: object, method: str):
    # The dependency's methods exist only once it is connected, so look them up per call.
    async def call(*args):
        return await getattr(service.to_async, method)(*args)

    return call


def _streamer(service: object):
    def stream(*args) -> AsyncGenerator[str, None]:
        return service.to_async.generate(*args)

    return stream


def _announces() -> bool:
    """Start-up lines (authentication, rate limits) are said once per start: by BentoML's arbiter (or a process
    with no workers), not again by each worker process, which builds the service anew."""
    from bentoml._internal.context import server_context

    return server_context.worker_index is None


def _add_middlewares(gateway: bentoml.Service, settings: Settings, authenticator: Authenticator | None) -> None:
    # The first added is the outermost: the access log sees every answer, the request id included.
    gateway.add_asgi_middleware(AccessLogMiddleware, enabled=settings.access_log)
    gateway.add_asgi_middleware(RequestIdMiddleware)
    # Security and overload, outermost first: admission (in-flight, body size, timeout), who is calling,
    # then their rate limits.
    gateway.add_asgi_middleware(
        OverloadMiddleware,
        max_in_flight=settings.max_in_flight,
        max_body_bytes=settings.max_body_bytes,
        timeout=settings.request_timeout_seconds,
        retry_after=settings.retry_after_seconds,
    )
    gateway.add_asgi_middleware(
        AuthMiddleware,
        authenticator=authenticator,
        client_address=ClientAddress(settings.trusted_proxies),
    )
    if (rate_limiter := RateLimiter.from_settings(settings, announce=_announces())) is not None:
        gateway.add_asgi_middleware(RateLimitMiddleware, limiter=rate_limiter)
    # Innermost: BentoML's /schema.json with our routes, and 405s in the one error body.
    gateway.add_asgi_middleware(BentoRoutesMiddleware)

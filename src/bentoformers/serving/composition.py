"""The whole service from the settings: one model service per served model, and the public `Gateway`.

The Gateway is a BentoML service around the Starlette app (api/), with a dependency on each model
service and the stored files of each model (card and tokenizer), under identifiers that
`StoredModel.attribute` spells so that no two model names can meet. Middlewares wrap it outermost first.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncGenerator

import bentoml

from bentoformers.api.app import create_app
from bentoformers.api.endpoint import ModelEndpoint
from bentoformers.api.gateway import Gateway as ModelChooser
from bentoformers.middleware.access_log import AccessLogMiddleware
from bentoformers.middleware.auth import AuthMiddleware
from bentoformers.middleware.body import BodyMiddleware
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.middleware.internal import INTERNAL_TOKEN_HEADER, InternalCallerMiddleware
from bentoformers.middleware.overload import OverloadMiddleware
from bentoformers.middleware.rate_limit import RateLimitMiddleware
from bentoformers.middleware.request_id import RequestIdMiddleware
from bentoformers.middleware.shutdown import ShutdownMiddleware
from bentoformers.security.authenticator import startup_authenticator
from bentoformers.security.ratelimit import RateLimiter
from bentoformers.serving.drain import ShutdownDrain
from bentoformers.serving.model_services import SERVICE_CLASSES
from bentoformers.serving.store import StoredModel, check_attributes_unique, served_models
from bentoformers.settings import Settings


def compose(settings: Settings, served: list[StoredModel] | None = None) -> bentoml.Service:
    """The Gateway service of the served models (default: the built entries the settings select)."""
    served = served_models(settings) if served is None else served
    check_attributes_unique(served)
    app = create_app()
    token = internal_token(settings)
    attrs: dict[str, object] = {
        "_served": served, "_settings": settings, "_asgi": app, "_token": token, "_drain": ShutdownDrain(grace_seconds=2.0),
        "__module__": "service",
    }
    for stored in served:
        attrs[stored.attribute] = bentoml.depends(model_service(stored, settings, token))
        # The gateway reads each model's card and tokenizer from the stored files.
        attrs[stored.files_attribute] = bentoml.models.BentoModel(next(iter(stored.variants.values())))
    cls = type("Gateway", (_Gateway,), attrs)
    # BentoML's text access log is replaced by AccessLogMiddleware's JSON lines (and their CPU cost saved), and
    # its HTTP metrics by ours: it labels them by raw path, so random URLs grew /metrics without bound. The app
    # serves /metrics itself (observability/scrape.py), every process's metrics as before.
    gateway = bentoml.service(
        name="bentoformers", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}},
        metrics={"enabled": False},
        # /readyz is __is_ready__ (serving/health.py): BentoML's own probe of the dependencies waits on a dead one.
        runner_probe={"enabled": False},
    )(bentoml.asgi_app(app, path="/")(cls))
    _add_middlewares(gateway, settings)
    return gateway


def internal_token(settings: Settings) -> str:
    """The token the gateway sends and the model services require (middleware/internal.py). Unset, one is made
    and put in the environment: `bentoml serve` composes in its own process first, and every service process
    it starts inherits that environment, so they all agree."""
    if settings.internal_token is not None:
        return settings.internal_token.get_secret_value()
    return os.environ.setdefault("BENTOFORMERS_INTERNAL_TOKEN", secrets.token_urlsafe(32))


def model_service(stored: StoredModel, settings: Settings, token: str) -> bentoml.Service:
    attrs: dict[str, object] = {"stored": stored, "settings": settings, "__module__": "service"}
    # Every stored variant is declared, so the bento and its image carry all of them.
    for precision, tag in stored.variants.items():
        attrs[f"model_{precision}"] = bentoml.models.BentoModel(tag)
    cls = type(stored.attribute, (SERVICE_CLASSES[stored.task],), attrs)
    # Internal service: its per-call access log would only repeat the gateway's, at a real CPU cost.
    service = bentoml.service(
        name=f"model-{stored.name}", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}}
    )(cls)
    service.add_asgi_middleware(InternalCallerMiddleware, token=token)
    return service


class _Gateway:
    _served: list[StoredModel]
    _settings: Settings
    _asgi: object
    _token: str
    _drain: ShutdownDrain

    def __init__(self) -> None:
        endpoints = []
        for stored in self._served:
            service = getattr(self, stored.attribute)
            _send_token(service, self._token)
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
        # On SIGTERM: finish the requests in flight, refuse new ones (middleware/shutdown.py), then stop.
        self._drain.install()

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz hook: ready once every model service answers a real call (liveness stays BentoML's)."""
        return await self._asgi.state.gateway.ready()


def _send_token(service: object, token: str) -> None:
    """Every call to a remote model service carries the internal token. BentoML's clients share one dict of
    default headers with the sessions they open later (in process, the dependency is the object itself)."""
    for client in (getattr(service, "to_async", None), getattr(service, "to_sync", None)):
        headers = getattr(client, "default_headers", None)
        if isinstance(headers, dict):
            headers[INTERNAL_TOKEN_HEADER] = token


def _caller(service: object, method: str):
    # The dependency's methods exist only once it is connected, so look them up per call.
    async def call(*args):
        return await getattr(service.to_async, method)(*args)

    return call


def _streamer(service: object):
    def stream(*args) -> AsyncGenerator[str, None]:
        return service.to_async.generate(*args)

    return stream


def _add_middlewares(gateway: bentoml.Service, settings: Settings) -> None:
    # The first added is the outermost: the access log sees every answer, the request id included.
    gateway.add_asgi_middleware(AccessLogMiddleware, enabled=settings.access_log)
    gateway.add_asgi_middleware(RequestIdMiddleware)
    gateway.add_asgi_middleware(ShutdownMiddleware, drain=gateway.inner._drain, retry_after=settings.retry_after_seconds)
    # Security and overload, outermost first: who is calling (from the headers alone), then their body
    # (bounded in size and time, and read before a slot is taken, so a slow sender holds none), admission
    # (in-flight, timeout), then their rate limits. Refuses to start in a container with no credentials
    # (BentoML's images set BENTOML_CONTAINERIZED=true).
    gateway.add_asgi_middleware(
        AuthMiddleware,
        authenticator=startup_authenticator(settings, containerized=os.environ.get("BENTOML_CONTAINERIZED") == "true"),
        client_address=ClientAddress(settings.trusted_proxies),
    )
    gateway.add_asgi_middleware(
        BodyMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
    )
    gateway.add_asgi_middleware(
        OverloadMiddleware,
        max_in_flight=settings.max_in_flight,
        max_body_bytes=settings.max_body_bytes,
        timeout=settings.request_timeout_seconds,
        retry_after=settings.retry_after_seconds,
    )
    if (rate_limiter := RateLimiter.from_settings(settings)) is not None:
        gateway.add_asgi_middleware(RateLimitMiddleware, limiter=rate_limiter)

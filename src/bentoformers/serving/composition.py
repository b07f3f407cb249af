"""The whole service from the settings: one model service per served model, and the public `Gateway`.

The Gateway is a BentoML service around the Starlette app (api/), with the stored files of each model
(card and tokenizer) under identifiers that `StoredModel.attribute` spells so that no two model names can
meet. Each model service runs either in the gateway's own process (CPU: no hop, one copy of the weights)
or as a BentoML dependency in a process of its own (CUDA, or to scale them apart); the same class serves
both. Middlewares wrap the gateway outermost first.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncGenerator

import aiohttp
import bentoml

from bentoformers.api.app import create_app
from bentoformers.api.openapi import bentoml_schema
from bentoformers.api.routes import (
    ALLOWED_METHODS,
    DOC_PATHS,
    PROBE_PATHS,
    PUBLIC_PATHS,
    ROUTE_TASKS,
)
from bentoformers.gateway.chooser import ModelChooser
from bentoformers.gateway.endpoint import EncoderEndpoint, GeneratorEndpoint
from bentoformers.middleware.access_log import AccessLogMiddleware
from bentoformers.middleware.auth import AuthMiddleware
from bentoformers.middleware.bentoml_routes import BentoRoutesMiddleware
from bentoformers.middleware.body import BodyMiddleware
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.middleware.internal import INTERNAL_TOKEN_HEADER, InternalCallerMiddleware
from bentoformers.middleware.overload import OverloadMiddleware
from bentoformers.middleware.rate_limit import RateLimitMiddleware
from bentoformers.middleware.request_id import RequestIdMiddleware
from bentoformers.middleware.shutdown import ShutdownDrain, ShutdownMiddleware
from bentoformers.middleware.tracing import TracingMiddleware
from bentoformers.observability import tracing
from bentoformers.runtime.cpu import cap_malloc_arenas, usable_cores
from bentoformers.runtime.session import cuda_likely
from bentoformers.security.authenticator import Authenticator, startup_authenticator
from bentoformers.security.ratelimit import RateLimiter
from bentoformers.serving import connection_limits
from bentoformers.serving.model_services import service_class
from bentoformers.serving.store import StoredModel, check_attributes_unique, served_models
from bentoformers.settings import Settings
from bentoformers.tasks import TASKS


def compose(settings: Settings, served: list[StoredModel] | None = None) -> bentoml.Service:
    """The Gateway service of the served models (default: the built entries the settings select)."""
    served = served_models(settings) if served is None else served
    check_attributes_unique(served)
    connection_limits.install(
        settings.header_timeout_seconds, settings.max_header_bytes, settings.write_stall_seconds, settings.trusted_proxies
    )
    cap_malloc_arenas(max(2, settings.threads()))
    # Refuses to start in a container with no credentials (BentoML's images set BENTOML_CONTAINERIZED=true).
    authenticator = startup_authenticator(
        settings, containerized=os.environ.get("BENTOML_CONTAINERIZED") == "true", announce=_announces()
    )
    app = create_app(
        secured=authenticator is not None, served={s.name: s.task for s in served},
        metrics_cache_seconds=settings.metrics_cache_seconds,
    )
    in_gateway = models_in_gateway(settings)
    if not in_gateway:
        # `bentoml serve` deletes its unix sockets' folder as soon as it is told to stop, before its services
        # have drained: a gateway call that needed a new connection to a model service then failed while that
        # service was still answering. Over loopback TCP the sockets close only once the services have stopped.
        os.environ.setdefault("BENTOML_NO_UDS", "1")
    token = internal_token(settings)
    local: dict[str, bentoml.Service] = {}
    attrs: dict[str, object] = {
        "_served": served, "_settings": settings, "_asgi": app, "_local": local, "_token": token,
        "_drain": ShutdownDrain(grace_seconds=2.0), "__module__": "service",
    }
    for stored in served:
        service = model_service(stored, settings, token, own_process=not in_gateway)
        if in_gateway:
            local[stored.name] = service
            # Declared here too, so that the bento and its image carry every variant.
            for precision, tag in stored.variants.items():
                attrs[f"{stored.attribute}__{precision}"] = bentoml.models.BentoModel(tag)
        else:
            attrs[stored.attribute] = bentoml.depends(service)
        # The gateway reads each model's card and tokenizer from the stored files.
        attrs[stored.files_attribute] = bentoml.models.BentoModel(next(iter(stored.variants.values())))
    cls = type("Gateway", (_Gateway,), attrs)
    # BentoML's text access log is replaced by AccessLogMiddleware's JSON lines (and their CPU cost saved), and
    # its HTTP metrics by ours: it labels them by raw path, so random URLs grew /metrics without bound. The app
    # serves /metrics itself (observability/scrape.py), every process's metrics as before.
    gateway = bentoml.service(
        name="bentoformers", workers=gateway_workers(settings, len(served)), traffic={"timeout": 60},
        logging={"access": {"enabled": False}}, metrics={"enabled": False},
        # /readyz is __is_ready__ (gateway/health.py): BentoML's own probe of the dependencies waits on a dead one.
        runner_probe={"enabled": False}, **_tracing(),
    )(bentoml.asgi_app(app, path="/")(cls))
    _add_middlewares(gateway, settings, authenticator)
    _drop_unused_bentoml_layers(gateway.name)
    return gateway


def _drop_unused_bentoml_layers(gateway_name: str) -> None:
    """BentoML wraps every service's app in layers that the gateway does not use, and at 1 text per request
    they cost a large share of its CPU per request (measured: README, Benchmark): an OpenTelemetry span per
    request (the gateway's own TracingMiddleware makes its spans, without the query string that BentoML's
    records), a timeout that runs each request in a task of its own (OverloadMiddleware already bounds a
    request's time, in the one error body), and a bentoml.Context per request for `@bentoml.api` methods, of
    which the gateway has none. The model services keep all of them, their OpenTelemetry layer without its span
    per ASGI message (one per chunk of a token stream)."""
    from _bentoml_impl.server.app import ContextMiddleware, ServiceAppFactory
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    bentoml_layers = getattr(ServiceAppFactory.middlewares.fget, "bentoml_layers", ServiceAppFactory.middlewares.fget)

    def middlewares(factory: ServiceAppFactory) -> list:
        kept = bentoml_layers(factory)
        if factory.service.name != gateway_name:
            for layer in kept:
                if layer.cls is OpenTelemetryMiddleware:
                    layer.kwargs["exclude_spans"] = ["receive", "send"]
            return kept
        unused = {ContextMiddleware, TimeoutMiddleware, OpenTelemetryMiddleware}
        return [layer for layer in kept if layer.cls not in unused]

    middlewares.bentoml_layers = bentoml_layers  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)


def models_in_gateway(settings: Settings) -> bool:
    if settings.model_process != "auto":
        return settings.model_process == "gateway"
    return not cuda_likely(settings.device)


def gateway_workers(settings: Settings, model_services: int) -> int:
    """Worker processes of the gateway. With the models in its process, one: a second worker would load every
    model again and split the cores between two ONNX Runtimes. With the models apart (their own processes: the
    GPU split), HTTP, validation and tokenizing are the gateway's CPU work, so it takes the usable cores, less one
    for each model service's own process."""
    if settings.gateway_workers:
        return settings.gateway_workers
    if models_in_gateway(settings):
        return 1
    return max(1, usable_cores() - model_services)


def _tracing() -> dict[str, object]:
    """BentoML's tracing configuration from the OpenTelemetry settings (observability/tracing.py); none when
    export is off, so a `tracing` section of the user's BentoML configuration still applies."""
    config = tracing.bentoml_config()
    return {} if config is None else {"tracing": config}


def internal_token(settings: Settings) -> str:
    """The token the gateway sends and the model services require (middleware/internal.py). Unset, one is made
    and put in the environment: `bentoml serve` composes in its own process first, and every service process
    it starts inherits that environment, so they all agree."""
    if settings.internal_token is not None:
        return settings.internal_token.get_secret_value()
    return os.environ.setdefault("BENTOFORMERS_INTERNAL_TOKEN", secrets.token_urlsafe(32))


def model_service(stored: StoredModel, settings: Settings, token: str, own_process: bool = True) -> bentoml.Service:
    attrs: dict[str, object] = {
        "stored": stored, "settings": settings, "own_process": own_process, "__module__": "service"
    }
    # Every stored variant is declared, so the bento and its image carry all of them.
    for precision, tag in stored.variants.items():
        attrs[f"model_{precision}"] = bentoml.models.BentoModel(tag)
    cls = type(stored.attribute, (service_class(stored.task),), attrs)
    # Internal service: its per-call access log would only repeat the gateway's, at a real CPU cost; its HTTP
    # metrics too, and they label calls by raw path (unbounded, as on the gateway: observability/scrape.py).
    service = bentoml.service(
        name=f"model-{stored.name}", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}},
        metrics={"enabled": False},
        # BentoML's dependency client replaces its HTTP session every 100 calls or 300 s by closing the old one,
        # which cuts every call still on it: under concurrent generation, streams died mid-way ("Connection
        # closed", "Server disconnected"). One session for the client's life instead; its idle connections
        # still close after the model service's keep-alive, so new ones spread over the replicas behind a URL.
        runner_connection={"max_requests": 2**31 - 1, "max_age": float(2**31)}, **_tracing(),
    )(cls)
    service.add_asgi_middleware(InternalCallerMiddleware, token=token)
    return service


class _Gateway:
    _served: list[StoredModel]
    _settings: Settings
    _asgi: object
    _local: dict[str, bentoml.Service]
    _token: str
    _drain: ShutdownDrain

    def __init__(self) -> None:
        endpoints = []
        models: dict[str, object] = {}  # name -> its model service: the instance in this process, or the client
        for stored in self._served:
            # A model in this process is an instance of its service class (BentoML runs its sync methods
            # in a thread for `to_async`, as for any local dependency); otherwise, the dependency's client.
            local = self._local.get(stored.name)
            service = local() if local is not None else getattr(self, stored.attribute)
            _send_token(service, self._token)
            _bound_reads_not_calls(service)
            models[stored.name] = service
            folder = getattr(self, stored.files_attribute).path
            describe = _caller(service, "describe")
            row = TASKS[stored.task]
            if row.decoder:
                endpoint = GeneratorEndpoint(
                    self._settings, folder, describe, stream=_streamer(service), cancel=_caller(service, "cancel")
                )
            else:
                endpoint = EncoderEndpoint(self._settings, folder, describe, call=_caller(service, row.method))
            endpoints.append(endpoint)
        self._asgi.state.chooser = ModelChooser(self._settings, endpoints)
        self._asgi.state.models = models
        # On SIGTERM: finish the requests in flight, refuse new ones (middleware/shutdown.py), then stop.
        self._drain.install()

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz hook: ready once every model service answers a real call (liveness stays BentoML's)."""
        return await self._asgi.state.chooser.ready()


def _send_token(service: object, token: str) -> None:
    """Every call to a remote model service carries the internal token. BentoML's clients share one dict of
    default headers with the sessions they open later (in process, the dependency is the object itself)."""
    for client in (getattr(service, "to_async", None), getattr(service, "to_sync", None)):
        headers = getattr(client, "default_headers", None)
        if isinstance(headers, dict):
            headers[INTERNAL_TOKEN_HEADER] = token


def _bound_reads_not_calls(service: object) -> None:
    """BentoML's dependency client bounds each call's whole duration by the model service's traffic timeout, so
    a generation streamed for longer (90 s of tokens) was cut mid-way. Bound the wait for each read instead, by
    the same seconds: a call still fails when its model service goes silent that long (a stream's silence is
    bounded sooner by `stream_idle_timeout_seconds`). Set before the client's first call opens its session."""
    manager = getattr(getattr(service, "to_async", None), "_session_manager", None)
    if manager is None:  # a model service in this process: no HTTP
        return
    seconds = manager._timeout.total
    manager._timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)


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
    # The first added is the outermost: the access log sees every answer, the request id and trace included.
    gateway.add_asgi_middleware(
        AccessLogMiddleware, enabled=settings.access_log, known_paths=PUBLIC_PATHS, quiet_paths=PROBE_PATHS,
        queue_lines=settings.access_log_queue_lines,
    )
    gateway.add_asgi_middleware(TracingMiddleware, known_paths=PUBLIC_PATHS)
    gateway.add_asgi_middleware(RequestIdMiddleware)
    gateway.add_asgi_middleware(
        ShutdownMiddleware, drain=gateway.inner._drain, retry_after=settings.retry_after_seconds,
        probe_paths=PROBE_PATHS,
    )
    # Security and overload, outermost first: who is calling (from the headers alone), then their body
    # (bounded in size and time, and read before a slot is taken, so a slow sender holds none), admission
    # (in-flight, timeout), then their rate limits.
    gateway.add_asgi_middleware(
        AuthMiddleware,
        authenticator=authenticator,
        client_address=ClientAddress(settings.trusted_proxies),
        open_paths=PROBE_PATHS | DOC_PATHS,
        route_tasks=ROUTE_TASKS,
    )
    gateway.add_asgi_middleware(
        BodyMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        exempt_paths=PROBE_PATHS,
        bodiless_paths=DOC_PATHS,
        max_bytes_in_flight=settings.max_body_bytes_in_flight,
        retry_after=settings.retry_after_seconds,
    )
    gateway.add_asgi_middleware(
        OverloadMiddleware,
        max_in_flight=settings.max_in_flight,
        timeout=settings.request_timeout_seconds,
        retry_after=settings.retry_after_seconds,
        exempt_paths=PROBE_PATHS,
    )
    if (rate_limiter := RateLimiter.from_settings(settings, announce=_announces())) is not None:
        gateway.add_asgi_middleware(RateLimitMiddleware, limiter=rate_limiter)
    # Innermost: BentoML's /schema.json with our routes, and 405s in the one error body.
    gateway.add_asgi_middleware(BentoRoutesMiddleware, allowed=ALLOWED_METHODS, schema=bentoml_schema())

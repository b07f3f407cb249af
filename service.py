"""The composition root that `bentoml serve` and bentofile.yaml point at.

Two services: `Embedder` (the model, adaptive batching, CPU or CUDA) and `Gateway` (public routes,
validation, tokenization, the API shapes), so model workers can scale apart from the gateway.
"""

from __future__ import annotations

import logging
import os
import time

import bentoml
import numpy as np

from bentoformers import metrics
from bentoformers.accesslog import AccessLogMiddleware
from bentoformers.auth import AuthMiddleware, ClientAddress, startup_authenticator
from bentoformers.engine import OnnxEncoder, pick_device
from bentoformers.gateway import Gateway as GatewayRuntime
from bentoformers.gateway import RequestIdMiddleware, create_app
from bentoformers.overload import OverloadMiddleware, ShutdownDrain
from bentoformers.ratelimit import RateLimiter, RateLimitMiddleware
from bentoformers.settings import Settings
from bentoformers.store import choose_precision, stored_variants

logger = logging.getLogger("bentoformers")
settings = Settings()
variants = stored_variants(settings.model)  # {precision: tag}; raises with a hint when nothing is built


class Embedder:
    """Runs the stored ONNX graph: fp16 on CUDA when built, else int8 on CPU (settings can force one)."""

    def __init__(self) -> None:
        started = time.perf_counter()
        self.device = pick_device(settings.device)
        self.precision = choose_precision(variants, self.device, settings.precision)
        model: bentoml.Model = getattr(self, f"model_{self.precision}")
        self.encoder = OnnxEncoder(
            model.path, device=self.device, threads=settings.threads(), max_batch_tokens=settings.max_batch_tokens
        )
        labels = (settings.model, self.precision, self.device)
        metrics.model_load_seconds.labels(*labels).set(time.perf_counter() - started)
        self.inference_seconds = metrics.inference_seconds.labels(*labels)
        self.gpu_memory = metrics.GpuMemory() if self.device == "cuda" else None
        logger.info("serving %s on %s (%s)", model.tag, self.device, self.precision)
        # On SIGTERM, keep answering while the gateway finishes its requests in flight.
        self.drain = ShutdownDrain()
        self.drain.install()

    @bentoml.api(batchable=True, max_batch_size=1024, max_latency_ms=60_000)
    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        started = time.perf_counter()
        with self.drain.busy():
            vectors = self.encoder.embed(token_ids)
        self.inference_seconds.observe(time.perf_counter() - started)
        if self.gpu_memory:
            self.gpu_memory.sample()
        return vectors

    @bentoml.api
    def describe(self) -> dict[str, str]:
        return {"precision": self.precision, "device": self.device}


# Every stored variant is declared, so the bento and its image carry all of them.
for _precision, _tag in variants.items():
    setattr(Embedder, f"model_{_precision}", bentoml.models.BentoModel(_tag))
# Internal service: its per-call access log would only repeat the gateway's, at a real CPU cost.
Embedder = bentoml.service(name="embedder", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}})(
    Embedder
)

app = create_app()


# BentoML's text access log is replaced by AccessLogMiddleware's JSON lines (and their CPU cost saved).
@bentoml.service(name="bentoformers", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}})
@bentoml.asgi_app(app, path="/")
class Gateway:
    model = bentoml.depends(Embedder)
    tokenizer = bentoml.models.BentoModel(next(iter(variants.values())))

    def __init__(self) -> None:
        app.state.gateway = GatewayRuntime(settings, self.tokenizer.path, call=self._embed, describe=self._describe)

    # The dependency's methods exist only once it is connected, so look them up per call.
    async def _embed(self, token_ids: list[list[int]]) -> np.ndarray:
        return await self.model.to_async.embed(token_ids)

    async def _describe(self) -> dict[str, str]:
        return await self.model.to_async.describe()


# The first added is the outermost: the access log sees every answer, the request id included.
Gateway.add_asgi_middleware(AccessLogMiddleware, enabled=settings.access_log)
Gateway.add_asgi_middleware(RequestIdMiddleware)
# Security and overload, outermost first: admission (in-flight, body size, timeout), who is calling,
# then their rate limits. Refuses to start in a container with no credentials (BentoML's images set
# BENTOML_CONTAINERIZED=true).
Gateway.add_asgi_middleware(
    OverloadMiddleware,
    max_in_flight=settings.max_in_flight,
    max_body_bytes=settings.max_body_bytes,
    timeout=settings.request_timeout_seconds,
    retry_after=settings.retry_after_seconds,
)
Gateway.add_asgi_middleware(
    AuthMiddleware,
    authenticator=startup_authenticator(settings, containerized=os.environ.get("BENTOML_CONTAINERIZED") == "true"),
    client_address=ClientAddress(settings.trusted_proxies),
)
if (rate_limiter := RateLimiter.from_settings(settings)) is not None:
    Gateway.add_asgi_middleware(RateLimitMiddleware, limiter=rate_limiter)

"""The composition root that `bentoml serve` and bentofile.yaml point at.

One model service per served model (each with its own workers, CPU or CUDA, scaled apart) and one
`Gateway` (public routes, model choice, validation, tokenization, the API shapes). The served models are
the built entries of the model list (settings can narrow them); their services are made here, at import.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator

import bentoml
import numpy as np

from bentoformers.api.app import create_app
from bentoformers.api.endpoint import ModelEndpoint
from bentoformers.api.gateway import Gateway as GatewayRuntime
from bentoformers.middleware.access_log import AccessLogMiddleware
from bentoformers.middleware.auth import AuthMiddleware
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.middleware.overload import OverloadMiddleware, ShutdownDrain
from bentoformers.middleware.rate_limit import RateLimitMiddleware
from bentoformers.middleware.request_id import RequestIdMiddleware
from bentoformers.observability import metrics
from bentoformers.runtime import cpu, selfcheck
from bentoformers.runtime.decoder import OnnxDecoder
from bentoformers.runtime.engine import ModelCard, OnnxEncoder, pick_device
from bentoformers.runtime.generation import Sampling, Scheduler
from bentoformers.security.authenticator import startup_authenticator
from bentoformers.security.ratelimit import RateLimiter
from bentoformers.serving.store import StoredModel, candidate_precisions, served_models
from bentoformers.settings import Settings

logger = logging.getLogger("bentoformers")
settings = Settings()
served = served_models(settings)  # raises with a hint when nothing is built


class _ModelService:
    """Loads the stored variant for this machine: fp16 on CUDA when built, else int8 on CPU (settings can force one)."""

    stored: StoredModel

    def _load(self):
        """The engine of the best variant that passes its start-up check on this CPU: fp16 on CUDA when built,
        else int8, else fp32 (settings can force one: then a failed check refuses to start)."""
        # BentoML's server logging shows only its own INFO lines. Not at import: BentoML names a worker's
        # log lines after the first one it formats, and at import the worker has no name yet.
        logger.setLevel(logging.INFO)
        self.started = time.perf_counter()
        self.device = pick_device(settings.device)
        requested = settings.model_precisions.get(self.stored.name, settings.precision)
        candidates = [
            (p, getattr(self, f"model_{p}").path) for p in candidate_precisions(self.stored.variants, self.device, requested)
        ]
        self.proof = selfcheck.first_that_holds(
            candidates, forced=requested != "auto", open_=self._open,
            on_refusal=lambda precision, reason: metrics.selfcheck_refusals.labels(self.stored.name, precision).inc(),
        )
        self.precision = self.proof.precision
        model: bentoml.Model = getattr(self, f"model_{self.precision}")
        checked = "not re-proven: no check set" if self.proof.figures is None else "check set " + ", ".join(
            f"{k} {v:.5f}" for k, v in self.proof.figures.items()
        )
        logger.info(
            "serving %s (%s) on %s (%s, %s; %s)",
            model.tag, self.stored.task, self.device, self.precision, cpu.isa_class(), checked,
        )
        self.inference_seconds = metrics.inference_seconds.labels(self.stored.name, self.precision, self.device)
        self.gpu_memory = metrics.GpuMemory() if self.device == "cuda" else None
        # On SIGTERM, keep answering while the gateway finishes its requests in flight.
        self.drain = ShutdownDrain()
        self.drain.install()
        return self.proof.engine

    def _loaded(self) -> None:
        elapsed = time.perf_counter() - self.started
        metrics.model_load_seconds.labels(self.stored.name, self.precision, self.device).set(elapsed)

    def _run(self, fn, *args):
        """One model call, timed and kept alive through a shutdown drain."""
        started = time.perf_counter()
        with self.drain.busy():
            out = fn(*args)
        self.inference_seconds.observe(time.perf_counter() - started)
        if self.gpu_memory:
            self.gpu_memory.sample()
        return out

    @bentoml.api
    def describe(self) -> dict[str, object]:
        return {
            "precision": self.precision,
            "device": self.device,
            "cpu": cpu.isa_class(),
            "selfcheck": self.proof.figures,
            "refused": [{"precision": r["precision"], "reason": r["reason"]} for r in self.proof.refused],
        }


class _EncoderService(_ModelService):
    def __init__(self) -> None:
        self.encoder = self._load()
        self._loaded()

    def _open(self, folder) -> OnnxEncoder:
        return OnnxEncoder(folder, device=self.device, threads=settings.threads(), max_batch_tokens=settings.max_batch_tokens)


class EmbeddingModel(_EncoderService):
    @bentoml.api(batchable=True, max_batch_size=1024, max_latency_ms=60_000)
    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        return self._run(self.encoder.embed, token_ids)


class ClassificationModel(_EncoderService):
    @bentoml.api(batchable=True, max_batch_size=1024, max_latency_ms=60_000)
    def classify(self, token_ids: list[list[int]]) -> np.ndarray:
        """Logits, one row per text (the gateway turns them into label scores)."""
        return self._run(self.encoder.classify, token_ids)


class GenerationModel(_ModelService):
    def __init__(self) -> None:
        decoder = self._load()
        card = ModelCard.load(getattr(self, f"model_{self.precision}").path)
        self.scheduler = Scheduler(
            decoder, card.eos_token_ids, card.max_length, settings.max_active_sequences, self.inference_seconds
        )
        self._loaded()

    def _open(self, folder) -> OnnxDecoder:
        return OnnxDecoder(folder, device=self.device, threads=settings.threads())

    @bentoml.api
    async def generate(
        self,
        token_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        key: str,
    ) -> AsyncGenerator[str, None]:
        """New token ids as text lines, then one line with the finish reason (or "error: ...").

        Lines, because the stream reaches the gateway in chunks that need not match the yields.
        """
        sampling = Sampling(temperature, top_p, top_k, seed)
        with self.drain.busy():
            async for kind, value in self.scheduler.generate(token_ids, max_new_tokens, sampling, key):
                yield f"{value}\n" if kind != "error" else f"error: {value}\n"

    @bentoml.api
    async def cancel(self, key: str) -> bool:
        return self.scheduler.cancel(key)


SERVICE_CLASSES = {"embeddings": EmbeddingModel, "classification": ClassificationModel, "generation": GenerationModel}


def _model_service(stored: StoredModel) -> bentoml.Service:
    attrs: dict[str, object] = {"stored": stored, "__module__": __name__}
    # Every stored variant is declared, so the bento and its image carry all of them.
    for precision, tag in stored.variants.items():
        attrs[f"model_{precision}"] = bentoml.models.BentoModel(tag)
    cls = type(stored.attribute, (SERVICE_CLASSES[stored.task],), attrs)
    # Internal service: its per-call access log would only repeat the gateway's, at a real CPU cost.
    return bentoml.service(
        name=f"model-{stored.name}", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}}
    )(cls)


model_services = {stored.name: _model_service(stored) for stored in served}
app = create_app()


class _Gateway:
    def __init__(self) -> None:
        endpoints = []
        for stored in served:
            service = getattr(self, stored.attribute)
            folder = getattr(self, stored.files_attribute).path
            call = stream = cancel = None
            if stored.task == "generation":
                stream, cancel = _streamer(service), _caller(service, "cancel")
            else:
                call = _caller(service, "embed" if stored.task == "embeddings" else "classify")
            endpoints.append(
                ModelEndpoint(
                    settings, folder, describe=_caller(service, "describe"), call=call, stream=stream, cancel=cancel
                )
            )
        app.state.gateway = GatewayRuntime(settings, endpoints)


def _caller(service: object, method: str):
    # The dependency's methods exist only once it is connected, so look them up per call.
    async def call(*args):
        return await getattr(service.to_async, method)(*args)

    return call


def _streamer(service: object):
    def stream(*args) -> AsyncGenerator[str, None]:
        return service.to_async.generate(*args)

    return stream


for _stored in served:
    setattr(_Gateway, _stored.attribute, bentoml.depends(model_services[_stored.name]))
    # The gateway reads each model's card and tokenizer from the stored files.
    setattr(_Gateway, _stored.files_attribute, bentoml.models.BentoModel(next(iter(_stored.variants.values()))))
_Gateway.__name__ = _Gateway.__qualname__ = "Gateway"

# BentoML's text access log is replaced by AccessLogMiddleware's JSON lines (and their CPU cost saved).
Gateway = bentoml.service(
    name="bentoformers", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}}
)(bentoml.asgi_app(app, path="/")(_Gateway))

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

"""The model services: one BentoML service per served model, running its graph on CPU or CUDA.

Each loads the best variant that passes its start-up check on this machine (runtime/selfcheck.py) and
answers the gateway's batched calls (embeddings, classification, rerank, token classification) or streams
tokens (generation). They are internal: in a process of their own they accept pickled bodies and must never
be reachable from outside.
On CPU they run inside the gateway's process instead (serving/composition.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

import bentoml
import numpy as np

from bentoformers.middleware.shutdown import ShutdownDrain
from bentoformers.observability import metrics, tracing
from bentoformers.observability.scrape import serve_metrics
from bentoformers.runtime import cpu, selfcheck
from bentoformers.runtime.card import ModelCard
from bentoformers.runtime.decoder import OnnxDecoder
from bentoformers.runtime.encoder import OnnxEncoder
from bentoformers.runtime.generation import Sampling, Scheduler
from bentoformers.runtime.session import pick_device
from bentoformers.serving.store import StoredModel, candidate_precisions
from bentoformers.settings import Settings
from bentoformers.tasks import TASKS

logger = logging.getLogger("bentoformers")
MAX_MERGED_BATCH = 1024  # texts BentoML's batcher may merge into one call of an encoder's batched method


class _ModelService:
    """Loads the stored variant for this machine: fp16 on CUDA when built, else int8 on CPU (settings can force one)."""

    stored: StoredModel  # set per model by composition.model_service
    settings: Settings
    own_process: bool  # False: it runs inside the gateway's process

    def _load(self):
        """The engine of the fastest variant that passes its start-up check on this machine (runtime/selfcheck.py;
        settings can force one: then a failed check refuses to start)."""
        # BentoML's server logging shows only its own INFO lines. Not at import: BentoML names a worker's
        # log lines after the first one it formats, and at import the worker has no name yet.
        logger.setLevel(logging.INFO)
        self.started = time.perf_counter()
        self.device = pick_device(self.settings.device)
        requested = self.settings.model_precisions.get(self.stored.name, self.settings.precision)
        candidates = [
            (p, getattr(self, f"model_{p}").path) for p in candidate_precisions(self.stored.variants, self.device, requested)
        ]
        self.proof = selfcheck.fastest_that_holds(
            candidates, forced=requested != "auto", open_=self._open, threadings=self.settings.run_threads == 0,
            on_refusal=lambda precision, reason: metrics.selfcheck_refusals.labels(self.stored.name, precision).inc(),
        )
        self.precision = self.proof.precision
        model: bentoml.Model = getattr(self, f"model_{self.precision}")
        checked = "not re-proven: no check set" if self.proof.figures is None else "check set " + ", ".join(
            f"{k} {v:.5f}" for k, v in self.proof.figures.items()
        )
        logger.info(
            "serving %s (%s) on %s (%s, %s; %s; %s; %s tokens/s)",
            model.tag, self.stored.task, self.device, self.precision, cpu.isa_class(), checked, self.proof.why,
            self.proof.tokens_per_second,
        )
        self.inference_seconds = metrics.inference_seconds.labels(self.stored.name, self.precision, self.device)
        self.gpu_memory = metrics.GpuMemory() if self.device == "cuda" else None
        if self.own_process and self.settings.metrics_port:
            serve_metrics(self.settings.metrics_port)
        # On SIGTERM, keep answering while the gateway finishes its requests in flight: at least 3 s, past the
        # gateway's own 2 s grace for what its clients had sent (middleware/shutdown.py). In the gateway's own
        # process the gateway's drain does it.
        self.drain = ShutdownDrain(grace_seconds=3.0)
        if self.own_process:
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
    async def describe(self) -> dict[str, object]:
        """Also the gateway's health call (gateway/health.py): async, so it never waits behind inference."""
        return {
            "precision": self.precision,
            "device": self.device,
            "cpu": cpu.isa_class(),
            "selfcheck": self.proof.figures,
            "refused": [{"precision": r["precision"], "reason": r["reason"]} for r in self.proof.refused],
            "chosen_because": self.proof.why,
            "timings": self.proof.timings,  # per variant that holds here, on its check set
            "tokens_per_second": self.proof.tokens_per_second,
            **getattr(self, "sizing", {}),  # on CUDA: the sub-batch size chosen at start, and why
        }


class _EncoderService(_ModelService):
    def __init__(self) -> None:
        self.encoder = self._load()
        self.sizing: dict[str, object] = {}
        check = selfcheck.load(self.encoder.folder) if self.device == "cuda" else None
        if check is not None:
            # the largest batch BentoML's batcher hands this service, of the check set's texts
            texts = [check["inputs"][i % len(check["inputs"])] for i in range(MAX_MERGED_BATCH)]
            self.sizing = self.encoder.size_sub_batches(texts)
        if self.sizing:
            logger.info("sub-batches of %s tokens on %s (tokens/s by size: %s)", self.sizing["sub_batch_tokens"],
                        self.device, self.sizing["tokens_per_second_by_sub_batch_tokens"])
        self._loaded()

    def _open(self, folder) -> OnnxEncoder:
        return OnnxEncoder(
            folder, device=self.device, threads=self.settings.threads(), spinning=self.settings.onnx_spinning,
            run_threads=self.settings.run_threads or 1,
        )


class GenerationModel(_ModelService):
    def __init__(self) -> None:
        decoder = self._load()
        card = ModelCard.load(getattr(self, f"model_{self.precision}").path)
        sequences = metrics.generation_sequences.labels(self.stored.name)
        tokens = metrics.generated_tokens.labels(self.stored.name)

        def on_step(active: int, new_tokens: int) -> None:
            sequences.set(active)
            tokens.inc(new_tokens)

        self.scheduler = Scheduler(
            decoder, card.eos_token_ids, card.max_length, self.settings.max_active_sequences, self.inference_seconds,
            on_step, max_waiting=self.settings.max_waiting_sequences,
            # A waiting sequence is heard from well within the gateway's idle timeout: queued is not stalled.
            waiting_note_seconds=self.settings.stream_idle_timeout_seconds / 3,
        )
        self._loaded()

    def _open(self, folder) -> OnnxDecoder:
        return OnnxDecoder(folder, device=self.device, threads=self.settings.threads())

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
        n: int = 1,
        caller: str = "",
    ) -> AsyncGenerator[str, None]:
        """`n` choices decoding together: lines "<choice> <token id>", then one "<choice> <finish reason>" (or
        "<choice> error: ...") per choice, and "<choice> waiting" now and then while it waits for a place.
        Choice i samples with seed + i, so a seeded request is reproducible and its choices differ. `caller`
        (the gateway's name for the identity) is whose turn it is in the round-robin admission.

        Lines, because the stream reaches the gateway in chunks that need not match the yields.
        """
        samplings = [Sampling(temperature, top_p, top_k, None if seed is None else seed + i) for i in range(n)]
        # Time to first token and decode steps as an event and attributes of one span, never a span per token.
        span = tracing.start_span("generate", {
            "bentoformers.model": self.stored.name, "bentoformers.precision": self.precision,
            "bentoformers.device": self.device, "bentoformers.prompt_tokens": len(token_ids),
            "bentoformers.choices": n, "bentoformers.max_new_tokens": max_new_tokens,
        })
        tokens, failure, started = [0] * n, None, time.perf_counter()
        try:
            with self.drain.busy():
                async for index, kind, value in self.scheduler.generate_n(token_ids, max_new_tokens, samplings, key, caller):
                    if kind == "waiting":
                        yield f"{index} waiting\n"
                        continue
                    if kind == "token":
                        tokens[index] += 1
                        if span is not None and sum(tokens) == 1:
                            ms = round((time.perf_counter() - started) * 1000, 3)
                            span.add_event("first_token", {"bentoformers.time_to_first_token_ms": ms})
                    yield f"{index} {value}\n" if kind != "error" else f"{index} error: {value}\n"
        except BaseException as exc:
            failure = exc
            raise
        finally:
            tracing.end_span(span, {"bentoformers.generated_tokens": sum(tokens), "bentoformers.decode_steps": max(tokens)}, failure)

    @bentoml.api
    async def cancel(self, key: str) -> bool:
        return self.scheduler.cancel(key)


def _batched(method: str):
    """The batched method of an encoder task's service (its row's `method`): token ids in, one row per sequence
    out: a pooled vector, logits, or logits per token (texts, longest text, labels; zero past each text's end)."""

    def call(self, token_ids: list[list[int]]) -> np.ndarray:
        batch = {
            "bentoformers.model": self.stored.name, "bentoformers.precision": self.precision,
            "bentoformers.device": self.device, "bentoformers.batch.items": len(token_ids),
            "bentoformers.batch.padded_tokens": len(token_ids) * max(map(len, token_ids), default=0),
        }
        with tracing.model_side("inference", batch, self.own_process):
            return self._run(self.encoder.embed, token_ids)

    call.__name__ = call.__qualname__ = method  # BentoML names the method and its route after the function
    return bentoml.api(batchable=True, max_batch_size=MAX_MERGED_BATCH, max_latency_ms=60_000)(call)


def service_class(task: str) -> type[_ModelService]:
    """The model service class of a task (tasks.py): the generator's, or an encoder's with its batched method."""
    row = TASKS[task]
    if row.decoder:
        return GenerationModel
    return type(f"{row.name.title().replace('-', '')}Model", (_EncoderService,), {row.method: _batched(row.method)})

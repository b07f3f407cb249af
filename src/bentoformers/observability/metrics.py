"""Every domain metric, in one place, at module level (what BentoML's HTTP metrics cannot see).

Under `bentoml serve` each worker is a process and BentoML sets PROMETHEUS_MULTIPROC_DIR, so these
values land in per-process files that the gateway's /metrics sums up. Labels take only values the code
chooses (route templates, model names, precisions, fixed reasons), never a raw path or user input.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "bentoformers"
# Seconds: from a fraction of a millisecond (a lone text on CPU) to the request timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

# Why a request was refused before it reached a model. Issue-specific code passes one of these.
REJECTION_REASONS = frozenset({
    "missing_credentials", "invalid_credentials", "expired_credentials", "forbidden",
    "rate_limit_requests", "rate_limit_tokens", "rate_limit_store_unavailable", "queue_full", "queue_timeout",
    "too_many_in_flight", "request_too_large", "body_timeout", "header_timeout",
})

write_stalls = Counter(
    "write_stalls", "Connections closed because their client stopped reading the answer (write_stall_seconds).",
    namespace=NAMESPACE,
)
requests = Counter(
    "requests", "Requests answered by the gateway, by route template and status code.",
    ["route", "code"], namespace=NAMESPACE,
)
requests_in_progress = Gauge(
    "requests_in_progress", "Gateway requests being answered now (summed over live workers).",
    namespace=NAMESPACE, multiprocess_mode="livesum",
)
request_seconds = Histogram(
    "request_duration_seconds", "Gateway request latency, first byte in to last byte out.",
    ["route"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)
queue_wait_seconds = Histogram(
    "queue_wait_seconds", "Time a request waited in the gateway queue before its model call started.",
    ["model"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)
queued_items = Gauge(
    "queued_items", "Texts waiting in the gateway queue for a model call (summed over live workers).",
    ["model"], namespace=NAMESPACE, multiprocess_mode="livesum",
)
batch_items = Histogram(
    "batch_items", "Texts per call from the gateway to the model service.",
    ["model"], namespace=NAMESPACE, buckets=SIZE_BUCKETS,
)
batch_tokens = Histogram(
    "batch_tokens", "Tokens per call from the gateway to the model service.",
    ["model"], namespace=NAMESPACE, buckets=TOKEN_BUCKETS,
)
tokens = Counter(
    "tokens", "Input tokens processed, by model and task.", ["model", "task"], namespace=NAMESPACE,
)
inference_seconds = Histogram(
    "inference_seconds", "Model service time per batch, by model, precision and device.",
    ["model", "precision", "device"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)
generated_tokens = Counter(
    "generated_tokens", "New tokens decoded, by model: every choice's, also those of a sequence stopped early.",
    ["model"], namespace=NAMESPACE,
)
generation_sequences = Gauge(
    "generation_sequences", "Sequences decoding in the model service (freed when they end or their client leaves).",
    ["model"], namespace=NAMESPACE, multiprocess_mode="livesum",
)
selfcheck_refusals = Counter(
    "selfcheck_refusals", "Variants passed over at start-up: their stored check set missed its gate on this CPU.",
    ["model", "precision"], namespace=NAMESPACE,
)
model_load_seconds = Gauge(
    "model_load_seconds", "Seconds the model service took to load a model variant.",
    ["model", "precision", "device"], namespace=NAMESPACE, multiprocess_mode="max",
)
rejections = Counter(
    "rejections", "Requests refused before any model work, by reason.", ["reason"], namespace=NAMESPACE,
)
access_log_lines_dropped = Counter(
    "access_log_lines_dropped", "Access log lines dropped because stdout did not keep up (its queue was full).",
    namespace=NAMESPACE,
)
gpu_memory_used_bytes = Gauge(
    "gpu_memory_used_bytes", "GPU memory in use on each visible device (NVML), where a GPU is present.",
    ["gpu"], namespace=NAMESPACE, multiprocess_mode="max",
)


for _reason in REJECTION_REASONS:  # exported at 0 from the start, so rate() and alerts see the first one
    rejections.labels(_reason)




def count_rejection(reason: str) -> None:
    rejections.labels(reason if reason in REJECTION_REASONS else "other").inc()


class GpuMemory:
    """Samples NVML at most every `period` seconds; does nothing without a GPU or without pynvml."""

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self._next = 0.0
        self._handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver, no library, no device: nothing to report
            self._handles = []

    def sample(self) -> None:
        if not self._handles or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.period
        for index, handle in enumerate(self._handles):
            try:
                used = self._nvml.nvmlDeviceGetMemoryInfo(handle).used
            except Exception:
                continue
            gpu_memory_used_bytes.labels(str(index)).set(used)

"""The one settings object. Only the composition root (service.py, the CLI) constructs it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["fp32", "int8", "fp16"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BENTOFORMERS_", env_ignore_empty=True, frozen=True)

    # Which models to serve: every entry of the model list that has a built variant, or the names given.
    model_list: str = Field("build/models.yaml", description="The model list whose built entries are served.")
    models: str = Field("", description="Comma-separated names to serve instead of every built entry.")
    default_model: str = Field("", description="For requests without `model`; default: the first served model of the route's task.")
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="auto: fp16 on CUDA when built, else int8, else fp32."
    )
    model_precisions: dict[str, Literal["auto", "fp32", "int8", "fp16"]] = Field(
        default_factory=dict,
        description='Per-model `precision`, e.g. {"gpt2": "fp32"}: int8 generation can change a greedy '
        "near-tie with its batch neighbours; fp32 does not.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_process: Literal["auto", "gateway", "separate"] = Field(
        "auto", description="Where the models run. gateway: in the gateway's process (one copy of the weights, no "
        "hop between processes). separate: one BentoML service process per model, to place or scale them apart (the "
        "GPU split). auto: gateway on CPU, separate on CUDA.",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 = one per core this process may use (CPU affinity and cgroup quota).")
    run_threads: int = Field(
        0, ge=0,
        description="ONNX Runtime threads per encoder sub-batch on CPU; the sub-batches of a call run side by side on "
        "the rest. 0: timed at start, one per sub-batch or every core on each, whichever runs the check set faster "
        "(int8 usually one, fp32 every core); 1: nothing waits for another thread; the number of cores: all of them "
        "on each sub-batch, so a lone long text finishes sooner on a machine with many cores.",
    )
    onnx_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's encoder threads spin-wait for work between operators: a lone request answers "
        "a little sooner, but the spinning takes the cores the gateway and the other requests need (README, Benchmark).",
    )
    max_items_per_request: int = Field(256, ge=1)
    max_chars_per_item: int = Field(
        100_000, ge=1, description="Refused before tokenizing, so a huge text cannot stall the gateway."
    )
    max_chars_per_request: int = Field(
        1_048_576, ge=1, description="All texts of a request together, refused before tokenizing (413)."
    )
    max_batch_items: int = Field(256, ge=1, description="Texts per call from gateway to model service.")
    max_batch_tokens: int = Field(16_384, ge=1, description="Token budget per call to the model service.")
    max_queued_items: int = Field(4096, ge=1, description="Beyond this the gateway answers 503.")
    max_queue_seconds: float = Field(
        10.0, gt=0, le=3600, allow_inf_nan=False,
        description="A request that would wait longer than this behind the queued work (at the model's recent "
        "tokens/s), and so likely miss its request timeout, gets 503 + Retry-After at once; lower it for "
        "latency-sensitive traffic.",
    )
    retry_after_seconds: int = Field(1, ge=1)
    access_log: bool = Field(True, description="One JSON line per gateway request on stdout.")

    # ---- security and overload (auth.py, ratelimit.py, overload.py) ----
    auth: Literal["auto", "required", "disabled"] = Field(
        "auto",
        description="auto: enforce when credentials are configured; with none, refuse to start in a container "
        "and run open (with a warning) elsewhere. required: refuse to start without credentials. disabled: open.",
    )
    api_keys_file: str | None = Field(None, description="YAML/JSON list of {id, hash, scopes, tier}.")
    api_keys: str | None = Field(None, description="The same list inline (e.g. a secret mounted as env).")
    jwt_secret: SecretStr | None = Field(None, description="HMAC secret (HS256/384/512), at least 32 bytes.")
    jwt_public_key_file: str | None = Field(None, description="PEM public key for RS256/ES256 tokens.")
    jwt_algorithms: tuple[str, ...] = Field(
        (), description="Accepted algorithms; default: HS256 with a secret, RS256 or ES256 from the key type."
    )
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_scope_claim: str = Field("scope", description="Space-separated string or list of task names.")
    jwt_tier_claim: str = "tier"
    jwt_leeway_seconds: int = Field(30, ge=0)
    redis_url: SecretStr | None = Field(
        None, description="redis://[:password@]host:port/db: rate-limit counts shared by all workers and replicas; "
        "without it they are per worker process. A secret (it can hold a password): environment only, no flag."
    )
    rate_limit_tiers: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description='{"tier": {"requests": "600/minute", "tokens": "200000/minute"}}; empty: no rate limits.',
    )
    rate_limit_on_store_error: Literal["open", "closed"] = Field(
        "open", description="When the store (Redis) is unreachable: open admits, closed answers 503."
    )
    rate_limit_store_timeout_seconds: float = Field(
        0.25, gt=0, le=10, description="A store (Redis) call slower than this counts as a store error."
    )
    trusted_proxies: tuple[str, ...] = Field((), description="Addresses/CIDRs whose X-Forwarded-For is believed.")
    max_in_flight: int = Field(256, ge=1, description="Requests in flight per gateway worker; beyond: 503.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    body_timeout_seconds: float = Field(
        30, gt=0, description="The time a client has to send its whole body (408 after it); not a slot meanwhile."
    )
    header_timeout_seconds: float = Field(
        10, gt=0, le=3600, allow_inf_nan=False, description="The time a connection has to send its request line and "
        "headers (from its opening, or from the first byte after a response): 408 after it, then closed."
    )
    write_stall_seconds: float = Field(
        30, gt=0, le=3600, allow_inf_nan=False, description="How long a connection's answer may wait for its client "
        "to read on (the transport's buffer full): past it the connection is closed, and the request's slot, its "
        "generation and the buffered answer are released.",
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="All request headers together; beyond: 431.")
    max_headers: int = Field(100, ge=8, description="Request headers; beyond: 431.")
    internal_token: SecretStr | None = Field(
        None, description="Shared by the gateway and the model services: a model service answers no one without "
        "it. Unset, `bentoml serve` makes one for the services it starts; services started apart (the gpu "
        "component) need the same value from a Secret."
    )
    metrics_cache_seconds: float = Field(
        1.0, ge=0, le=60, description="/metrics (no credentials needed) is rendered at most once per this many "
        "seconds, one render shared by concurrent scrapes; 0: every scrape renders (still one at a time).",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="A model service started on its own serves /metrics on this port "
        "(its API port answers only the gateway)."
    )
    request_timeout_seconds: float = Field(
        50, gt=0, description="Until the response starts; below BentoML's traffic timeout so ours answers."
    )

    # generation
    max_new_tokens: int = Field(512, ge=1, description="The most new tokens a generation request may ask for.")
    default_max_new_tokens: int = Field(64, ge=1)
    max_active_sequences: int = Field(32, ge=1, description="Sequences decoding together in one model service.")
    max_waiting_sequences: int = Field(256, ge=0, description="Beyond this, generation requests get 503.")
    max_sequences_per_request: int = Field(
        32, ge=1, description="Sequences one generation request may ask for, prompts times n together (413 beyond)."
    )
    max_sequences_per_caller: int = Field(
        64, ge=1, description="Sequences one caller (identity) may have generating at once in a gateway worker "
        "(429 + Retry-After beyond); the model service admits waiting sequences round-robin by caller.",
    )
    stream_idle_timeout_seconds: float = Field(
        30, gt=0, description="A generation whose model service sends nothing this long ends with a timeout error."
    )

    # logging and transport
    access_log_queue_lines: int = Field(
        10_000, ge=1, description="Access log lines waiting for stdout; beyond, a line is dropped and counted, so a "
        "log reader that stops reading never blocks serving."
    )
    max_body_bytes_in_flight: int = Field(
        256 * 1024 * 1024, ge=1024, description="Request body bytes being read at once per gateway worker (a declared "
        "length counts before its first byte); a body past it gets 503 + Retry-After before it is read."
    )

    # what a request body may make the gateway do (api/, gateway/endpoint.py)
    max_template_chars: int = Field(
        1000, ge=2, description="Characters of a zero-shot `hypothesis_template` (413 beyond); it is repeated in "
        "every text-and-label pair, each of which counts against max_chars_per_request.",
    )
    max_tokenize_tokens: int = Field(
        65_536, ge=1, description="Tokens /tokenize returns per request, all inputs together (413 beyond): each is a "
        "JSON object of some 80 bytes. They are charged to the caller's token budget too.",
    )
    max_sparse_terms: int = Field(
        262_144, ge=1, description="Terms an /embed_sparse answer holds, all texts together (413 beyond, naming "
        "top_k): each is a JSON object of some 35 bytes, and an untrained or unusual model weighs most of its "
        "vocabulary (30,522 terms per text for BERT's).",
    )

    # gateway width (serving/composition.py gateway_workers)
    gateway_workers: int = Field(
        0, ge=0, description="Gateway worker processes. 0: one when the models run in the gateway's process (the CPU "
        "default: each worker would load every model again and split the cores), else one per usable core less one "
        "per model service. Each worker has its own MAX_IN_FLIGHT, queue, body budget and in-process rate limits.",
    )

    def served_names(self) -> list[str]:
        return [n.strip() for n in self.models.split(",") if n.strip()]

    def threads(self) -> int:
        from bentoformers.runtime.cpu import usable_cores

        return self.intra_op_threads or usable_cores()

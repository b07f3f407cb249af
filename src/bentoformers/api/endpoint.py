"""The gateway's handle on one model service: tokenize, queue (the Coalescer), infer, generate, describe."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from bentoformers.errors import ApiError, ErrorType
from bentoformers.runtime.card import ModelCard
from bentoformers.runtime.tokenizer import InputTooLong, TextTokenizer
from bentoformers.serving.batcher import Coalescer
from bentoformers.serving.health import ModelDown, ModelHealth
from bentoformers.settings import Settings

logger = logging.getLogger("bentoformers.gateway")


INLINE_TOKENIZE_CHARS = 20_000  # above this, tokenize in a thread so the event loop stays free
CLOSE_SECONDS = 5.0  # the bound on closing a generation's stream and cancelling it in the model service


class ModelEndpoint:
    """One served model as the gateway sees it: its card and tokenizer, limits, and its model service."""

    def __init__(
        self,
        settings: Settings,
        model_folder: str | Path,
        describe: Callable[[], Awaitable[dict[str, Any]]],
        call: Callable[[list[list[int]]], Awaitable[np.ndarray]] | None = None,
        stream: Callable[..., AsyncIterator[str]] | None = None,
        cancel: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.settings = settings
        self.card = ModelCard.load(model_folder)
        self.name, self.task = self.card.name, self.card.task
        self.tokenizer = TextTokenizer(model_folder, self.card.max_length)
        self.coalescer = None
        if call is not None:
            self.coalescer = Coalescer(
                call,
                max_items=settings.max_batch_items,
                max_tokens=settings.max_batch_tokens,
                max_queued=settings.max_queued_items,
                retry_after=settings.retry_after_seconds,
                model=self.name,
            )
        self._stream = stream
        self._cancel = cancel
        self.generating = 0  # requests in flight to the model service (generation)
        self._describe = describe
        self.health = ModelHealth(self.name, describe)
        self._served: dict[str, Any] | None = None
        self.created = int(time.time())

    async def tokenize(self, texts: list[str], truncate: bool, param: str) -> list[list[int]]:
        self._check_texts(texts, param)
        try:
            if sum(map(len, texts)) > INLINE_TOKENIZE_CHARS:
                return await asyncio.to_thread(self.tokenizer.encode, texts, truncate)
            return self.tokenizer.encode(texts, truncate)
        except InputTooLong as exc:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param}[{exc.index}] has {exc.tokens} tokens, over the model's limit of {exc.limit}; "
                "shorten it or send truncate: true",
                param=f"{param}.{exc.index}",
            ) from None

    async def infer(self, ids: list[list[int]]) -> np.ndarray:
        """One row per sequence from the model service (embeddings or logits), batched with other requests."""
        assert self.coalescer is not None
        if self.health.down:  # a dead model service's calls would wait for its restart
            raise self.unavailable()
        try:
            return await self.health.unless_down(self.coalescer.submit(ids))
        except ApiError:
            raise
        except ModelDown:
            raise self.unavailable() from None
        except Exception as exc:
            self.health.failed(exc)
            # An honest 503, quietly: the model service logs its own failures, and a traceback per shed
            # request (BentoML's batcher under load) would bury everything else.
            logger.warning("model service call failed (%s): %s: %s", self.name, type(exc).__name__, exc)
            raise self.unavailable() from None

    async def prompt_ids(self, prompt: str, param: str) -> list[int]:
        if not prompt.strip():
            raise ApiError(ErrorType.VALIDATION, f"{param} is empty", param=param)
        if len(prompt) > self.settings.max_chars_per_item:
            raise ApiError(
                ErrorType.TOO_LARGE, f"{param} has {len(prompt)} characters; at most {self.settings.max_chars_per_item}",
                param=param,
            )
        if len(prompt) > INLINE_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(self.tokenizer.ids, prompt)
        else:
            ids = self.tokenizer.ids(prompt)
        if len(ids) >= self.card.max_length:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param} has {len(ids)} tokens; the model's context is {self.card.max_length} tokens, "
                "prompt and new tokens together",
                param=param,
            )
        return ids

    def check_generation_capacity(self) -> None:
        limit = self.settings.max_active_sequences + self.settings.max_waiting_sequences
        if self.generating >= limit:
            raise ApiError(
                ErrorType.OVERLOADED,
                f"the server is at capacity ({self.generating} generations in flight); "
                f"retry after {self.settings.retry_after_seconds}s",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )

    async def generate(self, prompt: list[int], max_new_tokens: int, sampling: dict[str, Any]) -> AsyncIterator[int | str]:
        """New token ids from the model service, then the finish reason ("stop" or "length")."""
        assert self._stream is not None
        if self.health.down:
            raise self.unavailable()
        self.check_generation_capacity()
        self.generating += 1
        key = uuid.uuid4().hex
        lines = self._stream(
            prompt, max_new_tokens, sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling["seed"], key
        )
        buffer, finished = "", False
        idle = self.settings.stream_idle_timeout_seconds
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):  # per chunk: a stalled model service must not hold the slot
                        chunk = await anext(lines)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise ApiError(
                        ErrorType.TIMEOUT, f"the model service sent nothing for {idle:g}s",
                        headers={"Retry-After": str(self.settings.retry_after_seconds)},
                    ) from None
                buffer += chunk
                *complete, buffer = buffer.split("\n")
                for line in complete:
                    if line.isdigit():
                        yield int(line)
                    elif line.startswith("error"):
                        raise RuntimeError(f"model service: {line}")
                    else:
                        finished = True
                        yield line
                        return
            raise RuntimeError("the model service ended the stream without a finish reason")
        finally:
            self.generating -= 1
            # Stopped early (a stop string, a client gone, an error): tell the model service to stop too.
            # Closing the stream alone does not reach it in time across processes. Shielded: this often
            # runs while the request's task is being cancelled.
            # Bounded: a hung model service must not hold this task (and its slot) forever either.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS) as bounded:
                await lines.aclose()
                if not finished and self._cancel is not None:
                    try:
                        await self._cancel(key)
                    except Exception:
                        logger.warning("could not cancel a generation in %s", self.name, exc_info=True)
            if bounded.cancelled_caught:
                logger.warning("closing a generation in %s took over %gs; left it", self.name, CLOSE_SECONDS)

    def unavailable(self) -> ApiError:
        return ApiError(
            ErrorType.OVERLOADED,
            "the model service is unavailable; retry shortly",
            headers={"Retry-After": str(self.settings.retry_after_seconds)},
        )

    def _check_texts(self, texts: list[str], param: str) -> None:
        limits = self.settings
        if not texts:
            raise ApiError(ErrorType.VALIDATION, f"{param} must hold at least one text", param=param)
        if len(texts) > limits.max_items_per_request:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param} holds {len(texts)} texts; at most {limits.max_items_per_request} per request",
                param=param,
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(ErrorType.VALIDATION, f"{param}[{i}] is empty", param=f"{param}.{i}")
            if len(text) > limits.max_chars_per_item:
                raise ApiError(
                    ErrorType.TOO_LARGE,
                    f"{param}[{i}] has {len(text)} characters; at most {limits.max_chars_per_item}",
                    param=f"{param}.{i}",
                )

    async def served(self) -> dict[str, Any]:
        """Precision and device, as the model service reports them (asked once)."""
        if self._served is None:
            self._served = await self._describe()
        return self._served

    async def describe(self) -> dict[str, Any]:
        try:
            served = await self.served()
        except Exception:
            logger.exception("model service describe failed (%s)", self.name)
            served = {}
        card = self.card
        entry: dict[str, Any] = {
            "id": card.name,
            "object": "model",
            "created": self.created,
            "owned_by": "bentoformers",
            "task": card.task,
            "precision": served.get("precision"),
            "device": served.get("device"),
            # The start-up check on the serving CPU, and any variant it refused (then a fallback serves).
            "cpu": served.get("cpu"),
            "selfcheck": served.get("selfcheck"),
            "refused_variants": served.get("refused", []),
        }
        if card.task == "embeddings":
            entry |= {"dimensions": card.dimensions, "max_input_tokens": card.max_length}
        elif card.task == "classification":
            entry |= {"labels": list(card.labels), "multi_label": card.multi_label, "max_input_tokens": card.max_length}
        if card.task != "generation":
            entry["max_items_per_request"] = self.settings.max_items_per_request
        else:
            entry |= {"context_length": card.max_length, "max_new_tokens": self.settings.max_new_tokens}
        return entry

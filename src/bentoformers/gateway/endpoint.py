"""The gateway's handle on one model service: tokenize, queue (the Coalescer), infer, generate, describe."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx
import numpy as np
from bentoml.exceptions import BentoMLException

from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.health import ModelDown, ModelHealth
from bentoformers.gateway.queue import Coalescer
from bentoformers.observability import tracing
from bentoformers.runtime.card import ModelCard
from bentoformers.runtime.chat import ChatTemplate
from bentoformers.runtime.generation import Sampling
from bentoformers.runtime.tokenizer import InputTooLong, TextTokenizer
from bentoformers.settings import Settings
from bentoformers.tasks import TASKS

logger = logging.getLogger("bentoformers.gateway")


INLINE_TOKENIZE_CHARS = 20_000  # above this, tokenize in a thread so the event loop stays free
CLOSE_SECONDS = 5.0  # the bound on closing a generation's stream and cancelling it in the model service
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
TRUNCATE_CHARS_PER_TOKEN = 16  # with truncate: true, a text is cut to the model's limit x this before tokenizing
# Whitespace, control and format characters (zero-width spaces and joiners, BOM, bidi marks, tags): a text of
# nothing else is as empty as "" (a tokenizer drops them all, and the model would see only its special tokens).
_INVISIBLE = re.compile(
    "[\\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u2028-\u202f\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000e0000-\U000e0fff]*"
)


def blank(text: str) -> bool:
    return _INVISIBLE.fullmatch(text) is not None


def unavailable_error(exc: BaseException) -> bool:
    """The model service could not be reached, or shed the call (BentoML's batcher under load), as opposed to
    failing on it: only then is an answer worth retrying. (BentoML calls a dependency with aiohttp.)"""
    if isinstance(exc, (aiohttp.ClientError, httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, BentoMLException) and int(exc.error_code) in RETRYABLE_STATUSES


class ModelEndpoint:
    """One served model as the gateway sees it: its card and tokenizer, the checks on its texts, its health, and
    what /v1/models says of it. EncoderEndpoint and GeneratorEndpoint add the calls to its model service."""

    def __init__(
        self, settings: Settings, model_folder: str | Path, describe: Callable[[], Awaitable[dict[str, Any]]]
    ) -> None:
        self.settings = settings
        self.card = ModelCard.load(model_folder)
        self.name, self.task = self.card.name, self.card.task
        self.tokenizer = TextTokenizer(model_folder, self.card.max_length)
        self._describe = describe
        self.health = ModelHealth(self.name, self._ping)
        self._served: dict[str, Any] | None = None
        self.created = int(time.time())

    async def _ping(self) -> dict[str, Any]:
        """The health call (gateway/health.py): the model service's describe."""
        return await self._describe()

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
            # Why this variant serves: the fastest that holds here, timed on the check set at start-up.
            "chosen_because": served.get("chosen_because"),
            "variant_timings": served.get("timings"),
            "tokens_per_second": served.get("tokens_per_second"),
        }
        if "sub_batch_tokens" in served:  # on CUDA, chosen at start by measurement
            entry["sub_batch_tokens"] = served["sub_batch_tokens"]
            entry["tokens_per_second_by_sub_batch_tokens"] = served["tokens_per_second_by_sub_batch_tokens"]
        return entry | TASKS[card.task].describe(card)

    def unavailable(self) -> ApiError:
        return ApiError(
            ErrorType.OVERLOADED,
            "the model service is unavailable; retry shortly",
            headers={"Retry-After": str(self.settings.retry_after_seconds)},
        )

    def check_text(self, text: str, param: str, shown: str | None = None) -> None:
        """One text: not empty (nothing but invisible characters) and within the characters a text may have.
        `shown` names it in the message (default: `param`)."""
        shown = shown or param
        if blank(text):
            raise ApiError(ErrorType.VALIDATION, f"{shown} is empty", param=param)
        if len(text) > self.settings.max_chars_per_item:
            raise ApiError(
                ErrorType.TOO_LARGE, f"{shown} has {len(text)} characters; at most {self.settings.max_chars_per_item}",
                param=param,
            )

    async def text_ids(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """One text checked (check_text) and tokenized whole, off the event loop when it is long."""
        self.check_text(text, param)
        with tracing.stage("tokenize"):
            if len(text) > INLINE_TOKENIZE_CHARS:
                return await asyncio.to_thread(self.tokenizer.ids, text, add_special_tokens)
            return self.tokenizer.ids(text, add_special_tokens)

    def check_texts(self, texts: list[str], param: str, prompt: str = "") -> None:
        """The texts of a request: how many, each one (check_text), and their characters in all, `prompt` (put
        before each text) counted once per text, as it is tokenized."""
        limits = self.settings
        if not texts:
            raise ApiError(ErrorType.VALIDATION, f"{param} must hold at least one text", param=param)
        if len(texts) > limits.max_items_per_request:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param} holds {len(texts)} texts; at most {limits.max_items_per_request} per request",
                param=param,
            )
        total = 0
        for i, text in enumerate(texts):
            self.check_text(text, f"{param}.{i}", shown=f"{param}[{i}]")
            total += len(text)
        total += len(prompt) * len(texts)
        if total > limits.max_chars_per_request:
            with_prompt = f", the prompt's {len(prompt)} counted with each text," if prompt else ""
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param} holds {total} characters in all{with_prompt}; at most {limits.max_chars_per_request} per request "
                "(with truncate: true, only the first "
                f"{self.card.max_length * TRUNCATE_CHARS_PER_TOKEN} characters of each text count, or the last when "
                "cut on the left)",
                param=param,
            )


class EncoderEndpoint(ModelEndpoint):
    """An encoder (embeddings, classification, rerank, token classification): texts are tokenized here and queued
    (the Coalescer) into batched calls of its model service, one row per sequence back."""

    def __init__(
        self,
        settings: Settings,
        model_folder: str | Path,
        describe: Callable[[], Awaitable[dict[str, Any]]],
        call: Callable[[list[list[int]]], Awaitable[np.ndarray]],
    ) -> None:
        super().__init__(settings, model_folder, describe)
        self._call = call
        self.coalescer = Coalescer(
            self._model_call,
            max_items=settings.max_batch_items,
            max_tokens=settings.max_batch_tokens,
            max_queued=settings.max_queued_items,
            max_wait=settings.max_queue_seconds,
            retry_after=settings.retry_after_seconds,
            model=self.name,
        )

    async def describe(self) -> dict[str, Any]:
        return await super().describe() | {"max_items_per_request": self.settings.max_items_per_request}

    async def _ping(self) -> dict[str, Any]:
        """The health call, whose answer also seeds the queue's rate with the model service's start-up timing."""
        served = await self._describe()
        self.coalescer.seed_rate(served.get("tokens_per_second"))
        return served

    async def tokenize(
        self, texts: list[str], truncate: bool, param: str, direction: str = "right", prompt: str = ""
    ) -> list[list[int]]:
        """Token ids per text, `prompt` before each; with `truncate`, cut to the limit on the `direction` side."""
        if truncate:
            # Only the first tokens (the last, cut on the left) are kept: do not tokenize (nor count) far past them.
            keep = self.card.max_length * TRUNCATE_CHARS_PER_TOKEN
            texts = [text[-keep:] if direction == "left" else text[:keep] for text in texts]
        self.check_texts(texts, param, prompt)
        self.coalescer.check_room(len(texts))
        try:
            with tracing.stage("tokenize"):
                if sum(map(len, texts)) + len(prompt) * len(texts) > INLINE_TOKENIZE_CHARS:
                    return await asyncio.to_thread(self.tokenizer.encode, texts, truncate, direction, prompt)
                return self.tokenizer.encode(texts, truncate, direction, prompt)
        except InputTooLong as exc:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param}[{exc.index}] has {exc.tokens} tokens, over the model's limit of {exc.limit}; "
                "shorten it or send truncate: true",
                param=f"{param}.{exc.index}",
            ) from None

    async def tokenize_pairs(
        self,
        pairs: list[tuple[str, str]],
        truncate: bool,
        param: str,
        item_of: Callable[[int], int] = lambda pair: pair,
        strategy: str = "longest_first",
    ) -> list[list[int]]:
        """Pairs of texts (query and document, premise and hypothesis) as one sequence each; the caller checks
        its texts (check_texts). A pair over the limit is named `param.<item_of(pair)>`: the item of the
        request it came from. The pairs' characters count against max_chars_per_request as they are tokenized:
        a query (a hypothesis) repeated in every pair counts every time."""
        limits = self.settings
        if len(pairs) > limits.max_items_per_request:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"the request makes {len(pairs)} pairs for the model; at most {limits.max_items_per_request}",
                param=param,
            )
        chars = sum(len(a) + len(b) for a, b in pairs)
        if chars > limits.max_chars_per_request:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"the request makes {len(pairs)} pairs of {chars} characters in all (the text repeated in each pair "
                f"counted in each); at most {limits.max_chars_per_request} per request",
                param=param,
            )
        self.coalescer.check_room(len(pairs))
        try:
            with tracing.stage("tokenize"):
                if chars > INLINE_TOKENIZE_CHARS:
                    return await asyncio.to_thread(self.tokenizer.encode_pairs, pairs, truncate, strategy)
                return self.tokenizer.encode_pairs(pairs, truncate, strategy)
        except InputTooLong as exc:
            item = f"{param}.{item_of(exc.index)}"
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{item} makes a pair of {exc.tokens} tokens, over the model's limit of {exc.limit}; shorten it"
                + ("" if truncate else " or send truncate: true"),
                param=item,
            ) from None

    async def infer(self, ids: list[list[int]]) -> np.ndarray:
        """One row per sequence from the model service (embeddings or logits), batched with other requests."""
        if self.health.down:  # a dead model service's calls would wait for its restart
            raise self.unavailable()
        return await self.coalescer.submit(ids)

    async def _model_call(self, ids: list[list[int]]) -> np.ndarray:
        """The model service call, its failure sorted once per call (not once per request of its batch): the
        model service unreachable or shedding is a retryable 503, logged quietly (a traceback per shed request
        would bury everything else); anything else is a bug, a 500 with its traceback."""
        try:
            try:
                return await self.health.unless_down(self._call(ids))
            except aiohttp.ClientConnectionError as exc:
                if not reached_no_model(exc):
                    raise  # health hears of it below, checks the model service, and 503s its waiters if it is down
                return await self.health.unless_down(self._call(ids))  # once more: it reached no model service
        except ApiError:
            raise
        except ModelDown:
            raise self.unavailable() from None
        except Exception as exc:
            if not unavailable_error(exc):
                logger.exception("model service call failed (%s)", self.name)
                raise ApiError(ErrorType.SERVER, "internal error; see the server log") from None
            self.health.failed(exc)
            logger.warning("model service unavailable (%s): %s: %s", self.name, type(exc).__name__, exc)
            raise self.unavailable() from None


class GeneratorEndpoint(ModelEndpoint):
    """A causal LM: its chat template, the sequences it has admitted, and its model service's token streams."""

    def __init__(
        self,
        settings: Settings,
        model_folder: str | Path,
        describe: Callable[[], Awaitable[dict[str, Any]]],
        stream: Callable[..., AsyncIterator[str]],
        cancel: Callable[[str], Awaitable[bool]],
    ) -> None:
        super().__init__(settings, model_folder, describe)
        self.chat = ChatTemplate.load(model_folder, self.card.chat_template) if self.card.chat_template else None
        self._stream = stream
        self._cancel = cancel
        self.generating = 0  # sequences admitted to the model service: reserve_generations
        self.generating_by_caller: dict[str, int] = {}

    async def describe(self) -> dict[str, Any]:
        return await super().describe() | {
            "max_new_tokens": self.settings.max_new_tokens, "chat_template": self.chat is not None
        }

    async def prompt_ids(self, prompt: str, param: str, add_special_tokens: bool = True) -> list[int]:
        ids = await self.text_ids(prompt, param, add_special_tokens)
        if len(ids) >= self.card.max_length:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{param} has {len(ids)} tokens; the model's context is {self.card.max_length} tokens, "
                "prompt and new tokens together",
                param=param,
            )
        return ids

    def reserve_generations(self, sequences: int, caller: str = "", param: str = "n") -> None:
        """Counts `sequences` in flight for `caller`: 413 past the sequences one request may ask for (naming
        `param`), 429 past those one caller may have in flight in this worker, 503 past the model service's
        active and waiting sequences. Checked and counted at once (no await between), so concurrent requests
        cannot all pass the check before any counts; the route releases them (release_generations) once their
        generation has ended or failed to start."""
        settings = self.settings
        if sequences > settings.max_sequences_per_request:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"the request asks for {sequences} sequences (prompts x n); at most "
                f"{settings.max_sequences_per_request} per request",
                param=param,
            )
        held = self.generating_by_caller.get(caller, 0)
        if held + sequences > settings.max_sequences_per_caller:
            raise ApiError(
                ErrorType.RATE_LIMITED,
                f"you have {held} sequences generating; at most {settings.max_sequences_per_caller} at once. "
                f"Retry after {settings.retry_after_seconds}s",
                headers={"Retry-After": str(settings.retry_after_seconds)},
            )
        limit = settings.max_active_sequences + settings.max_waiting_sequences
        if self.generating + sequences > limit:
            raise ApiError(
                ErrorType.OVERLOADED,
                f"the server is at capacity ({self.generating} generations in flight); "
                f"retry after {self.settings.retry_after_seconds}s",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )
        self.generating += sequences
        self.generating_by_caller[caller] = held + sequences

    def release_generations(self, sequences: int, caller: str = "") -> None:
        self.generating -= sequences
        left = self.generating_by_caller.pop(caller, 0) - sequences
        if left > 0:
            self.generating_by_caller[caller] = left

    async def generate(
        self, prompt: list[int], max_new_tokens: int, sampling: Sampling, n: int = 1, caller: str = ""
    ) -> AsyncGenerator[tuple[int, int | str], int | None]:
        """(choice, new token id) from the model service, then (choice, finish reason: "stop" or "length") once
        per choice; the `n` choices decode together. `asend(i)` after a choice's event stops choice i early
        (a stop string): it is cancelled in the model service while the others go on."""
        if self.health.down:
            raise self.unavailable()
        key = uuid.uuid4().hex
        args = (
            prompt, max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed, key, n, caller
        )
        lines = _reopened(lambda: self._stream(*args), self.health)
        buffer, open_choices = "", set(range(n))
        idle = self.settings.stream_idle_timeout_seconds
        trace, started, tokens, failure = tracing.current(), time.perf_counter(), 0, None
        span = tracing.span_of(trace, "generate", {
            "bentoformers.prompt_tokens": len(prompt), "bentoformers.choices": n,
            "bentoformers.max_new_tokens": max_new_tokens,
        })
        try:
            while True:
                try:
                    # per chunk: a stalled model service must not hold the slot; the span current, so the
                    # stream's call carries its traceparent
                    async with asyncio.timeout(idle):
                        with tracing.current_span(span):
                            chunk = await anext(lines)
                except StopAsyncIteration:
                    break
                except ModelDown:
                    raise self.unavailable() from None
                except TimeoutError:
                    raise ApiError(
                        ErrorType.TIMEOUT, f"the model service sent nothing for {idle:g}s",
                        headers={"Retry-After": str(self.settings.retry_after_seconds)},
                    ) from None
                buffer += chunk
                *complete, buffer = buffer.split("\n")
                for line in complete:
                    index_text, _, value = line.partition(" ")
                    index = int(index_text)
                    if index not in open_choices:
                        continue  # stopped early here: its last tokens were already on their way
                    if value.isdigit():
                        tokens += 1
                        if tokens == 1 and trace is not None:
                            trace.first("first_token", time.perf_counter() - started)
                            if span is not None:
                                span.add_event("first_token")
                        stop = yield index, int(value)
                    elif value == "waiting":  # queued for a place in the model service: alive, not stalled
                        continue
                    elif value == "overloaded":  # its queue is shared by every gateway worker and replica
                        raise ApiError(
                            ErrorType.OVERLOADED, "the model service's queue is full; retry later",
                            headers={"Retry-After": str(self.settings.retry_after_seconds)},
                        )
                    elif value.startswith("error"):
                        # The model service logged it, with its traceback.
                        raise ApiError(ErrorType.SERVER, "the generation failed; see the server log")
                    else:
                        open_choices.discard(index)
                        stop = yield index, value
                    while stop is not None:  # asend(choice): stop that choice now
                        open_choices.discard(stop)
                        await self._cancel_quietly(f"{key}:{stop}")
                        stop = yield -1, ""  # asend's own answer; the caller ignores it
                    if not open_choices:
                        return
            raise RuntimeError("the model service ended the stream without a finish reason")
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if trace is not None:
                trace.add("generate", time.perf_counter() - started)
            tracing.end_span(span, {"bentoformers.generated_tokens": tokens}, failure)
            # Stopped early (a client gone, an error): tell the model service to stop too. Closing the stream
            # alone does not reach it in time across processes. Shielded: this often runs while the
            # request's task is being cancelled. Bounded: a hung model service must not hold this task (and
            # its slot) forever either.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS) as bounded:
                await lines.aclose()
                if open_choices:
                    await self._cancel_quietly(key)
            if bounded.cancelled_caught:
                logger.warning("closing a generation in %s took over %gs; left it", self.name, CLOSE_SECONDS)

    async def _cancel_quietly(self, key: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(CLOSE_SECONDS):
                    await self._cancel(key)
            except Exception:
                logger.warning("could not cancel a generation in %s", self.name, exc_info=True)


def closed_under_us(exc: aiohttp.ClientConnectionError) -> bool:
    """BentoML's client closed its own session under this call (see _reopened), as opposed to a model service
    that went away: only aiohttp's words tell them apart."""
    return any(words in str(exc) for words in ("Connector is closed", "Can not write request body"))


def reached_no_model(exc: aiohttp.ClientConnectionError) -> bool:
    """The call failed in a way that says nothing of the model service, so one more try is worth it: its
    session was closed under it, or it went out on a keep-alive connection that the model service had just
    closed (aiohttp's keep-alive outlives uvicorn's, and it finds out only from the request it sends). A dead
    model service fails so too: the retry then waits on its socket, which BentoML's supervisor keeps open, until
    the health check (ModelHealth.unless_down) says it is down."""
    return closed_under_us(exc) or isinstance(exc, aiohttp.ServerDisconnectedError)


async def _reopened(open_stream: Callable[[], AsyncIterator[str]], health: ModelHealth | None = None) -> AsyncIterator[str]:
    """A model service stream, opened once more when it fails before the first chunk without having reached
    the model service (reached_no_model); the second try gives way (ModelDown) if `health` finds the service down."""
    lines = open_stream()
    try:
        first = await anext(lines)
    except StopAsyncIteration:
        return
    except aiohttp.ClientConnectionError as exc:
        if not reached_no_model(exc):
            raise
        await lines.aclose()
        lines = open_stream()
        try:
            first = await (health.unless_down(anext(lines)) if health is not None else anext(lines))
        except StopAsyncIteration:
            return
    try:
        yield first
        async for chunk in lines:
            yield chunk
    finally:
        await lines.aclose()

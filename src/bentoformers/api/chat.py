"""`POST /v1/chat/completions` in the OpenAI shape: the model's chat template renders the conversation, then
it generates as /v1/completions does (n choices decoding together, stop strings, streaming)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from bentoformers.api.generation import (
    Piece,
    StreamUsage,
    collect_generation,
    openai_head,
    plan_generation,
    seeded,
    start_generation,
    usage,
)
from bentoformers.api.schemas import ChatCompletionRequest
from bentoformers.api.sse import event_stream
from bentoformers.api.steps import chooser_of, json_response, parse_body
from bentoformers.errors import ApiError, ErrorType
from bentoformers.gateway.chooser import ModelChooser
from bentoformers.gateway.endpoint import INLINE_TOKENIZE_CHARS, GeneratorEndpoint
from bentoformers.observability import tracing
from bentoformers.runtime.chat import ChatTemplateError
from bentoformers.runtime.generation import Sampling

# OpenAI fields this server cannot honour, with the values that ask for nothing: any other value is a 400
# that names the field, never a silent ignore.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": None, "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "response_format": (None, {"type": "text"}),
    "web_search_options": (None,), "reasoning_effort": (None,),
}


def refuse_unsupported(data: Any) -> None:
    """400 naming the first field, message part or role this server does not support."""
    if not isinstance(data, dict):
        return
    for name, harmless in UNSUPPORTED.items():
        if harmless is not None and name in data and data[name] not in harmless:
            raise ApiError(
                ErrorType.INVALID_REQUEST, f"{name} is not supported by this server; remove it from the request",
                param=name,
            )
    messages = data.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict):
            continue
        for name in ("tool_calls", "function_call", "audio"):
            if message.get(name):
                raise ApiError(ErrorType.INVALID_REQUEST, f"messages[{i}].{name} is not supported by this server",
                               param=f"messages.{i}.{name}")
        if message.get("role") in ("tool", "function"):
            raise ApiError(ErrorType.INVALID_REQUEST,
                           f"messages[{i}].role {message['role']!r} is not supported: tools are not served here",
                           param=f"messages.{i}.role")
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") != "text":
                raise ApiError(
                    ErrorType.INVALID_REQUEST,
                    f"messages[{i}].content[{j}] is of type {part.get('type')!r}; only text parts are supported",
                    param=f"messages.{i}.content.{j}.type",
                )


def _pick(gateway: ModelChooser, requested: str | None) -> GeneratorEndpoint:
    """Without `model`: the default model if it chats, else the first served model with a chat template."""
    if requested is None:
        chatting = [e for e in gateway.models.values() if e.task == "generation" and e.chat is not None]
        default = gateway.models.get(gateway.settings.default_model)
        if chatting:
            return default if default in chatting else chatting[0]
    return gateway.pick(requested, "generation")


async def _prompt_ids(endpoint: GeneratorEndpoint, parts: list[tuple[str, bool]]) -> list[int]:
    """The rendered conversation's ids, the messages' text never making a special token (runtime/tokenizer.py,
    chat_ids), within the model's context."""
    rendered = "".join(text for text, _ in parts)
    endpoint.check_text(rendered, "messages")
    with tracing.stage("tokenize"):
        if len(rendered) > INLINE_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(endpoint.tokenizer.chat_ids, parts)
        else:
            ids = endpoint.tokenizer.chat_ids(parts)
    if len(ids) >= endpoint.card.max_length:
        raise ApiError(
            ErrorType.TOO_LARGE,
            f"messages has {len(ids)} tokens; the model's context is {endpoint.card.max_length} tokens, "
            "prompt and new tokens together",
            param="messages",
        )
    return ids


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions: {"messages", "max_completion_tokens"? (or "max_tokens"), "temperature"?,
    "top_p"?, "seed"?, "stop"?, "n"?, "stream"?, "stream_options"?, "model"?}."""
    body = parse_body(ChatCompletionRequest, await request.body(), refuse=refuse_unsupported)
    endpoint = _pick(chooser_of(request), body.model)
    if endpoint.chat is None:
        raise ApiError(
            ErrorType.INVALID_REQUEST,
            f"model {endpoint.name!r} has no chat template. Add one to its entry in the model list "
            "(chat_template: a built-in name such as chatml or dialogpt, a .jinja file, or the Jinja text) and "
            f"rebuild it (bentoformers build --only {endpoint.name}), or send a plain prompt to /v1/completions",
            param="model",
        )
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        parts = endpoint.chat.render_parts(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise ApiError(ErrorType.INVALID_REQUEST, f"the model's chat template refused the messages: {exc}",
                       param="messages") from None
    ids = await _prompt_ids(endpoint, parts)
    max_new, max_param = body.max_completion_tokens, "max_completion_tokens"
    if max_new is None:
        max_new, max_param = body.max_tokens, "max_tokens"
    temperature = 1.0 if body.temperature is None else body.temperature  # the OpenAI default
    sampling = Sampling(temperature, body.top_p, body.top_k, seeded(body.seed, 0))
    plan = await plan_generation(endpoint, ids, max_new, max_param, sampling, body.stop, body.n)
    events, first = await start_generation(request, endpoint, [plan])
    head = openai_head(request, "chatcmpl", "chat.completion", endpoint.name)
    prompt_tokens = len(ids)
    if body.stream:
        return _stream(request, events, first, {**head, "object": "chat.completion.chunk"}, body, prompt_tokens)
    whole = await collect_generation(request, events, first)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": p.text}, "logprobs": None, "finish_reason": p.finish}
        for i, p in whole.items()
    ]
    return json_response({**head, "choices": choices, "usage": usage(prompt_tokens, sum(p.tokens for p in whole.values()))})


def _stream(request: Request, events, first: Piece, head: dict[str, Any], body: ChatCompletionRequest,
            prompt_tokens: int) -> Response:
    """chat.completion.chunk events: each choice's first delta carries the role, its last the finish reason;
    with stream_options.include_usage a last chunk without choices carries the usage."""
    tally = StreamUsage(head, prompt_tokens, body.n, body.stream_options is not None and body.stream_options.include_usage)
    started: set[int] = set()

    def chunk(piece: Piece) -> list[Any]:
        out: list[Any] = []

        def choice(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            item = {"index": piece.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [item]}

        if piece.index not in started:
            started.add(piece.index)
            out.append(choice({"role": "assistant", "content": ""}))
        if piece.text:
            out.append(choice({"content": piece.text}))
        if piece.finish is not None:
            out.append(choice({}, piece.finish))
            out += tally.finished(piece)
        return out

    return event_stream(request, events, first, chunk)

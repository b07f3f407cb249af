"""POST /v1/chat/completions (and n choices on /v1/completions) in process, on the tiny chat model (`chat`)."""

from __future__ import annotations

import concurrent.futures

import orjson
import pytest
from chat_reference import CONVERSATIONS, expected_greedy
from helpers import post


@pytest.fixture(scope="module")
def chat_folder(served_build):
    import bentoml

    return bentoml.models.get(served_build["chat"]["fp32"].tag).path


@pytest.fixture(scope="module")
def scheduler(client):
    import service

    return service.Gateway.inner._asgi.state.models["chat"].scheduler


def chat(client, body):
    r = post(client, "/v1/chat/completions", {"model": "chat", **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(text):
    out = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert out[-1] == "[DONE]", out[-3:]
    return [orjson.loads(e) for e in out[:-1]]


def test_greedy_chat_is_in_process_greedy_decoding_of_the_rendered_template(client, chat_folder):
    for messages in CONVERSATIONS[:3]:
        body = chat(client, {"messages": messages, "max_completion_tokens": 20, "temperature": 0})
        text, finish, prompt_tokens = expected_greedy(chat_folder, messages, 20)
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "chat"
        (choice,) = body["choices"]
        assert choice == {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": finish}
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        assert body["usage"]["completion_tokens"] <= 20
        assert body["usage"]["total_tokens"] == prompt_tokens + body["usage"]["completion_tokens"]


def test_eight_concurrent_conversations_get_what_they_get_alone(client, chat_folder, scheduler):
    expected = [expected_greedy(chat_folder, m, 24)[0] for m in CONVERSATIONS]
    steps, rows = scheduler.steps, scheduler.rows_stepped

    def one(messages):
        return chat(client, {"messages": messages, "max_tokens": 24, "temperature": 0})["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
        together = list(pool.map(one, CONVERSATIONS))
    assert together == expected
    assert (scheduler.rows_stepped - rows) > 1.5 * (scheduler.steps - steps)  # they decoded together


def test_the_stream_is_chat_completion_chunks_with_the_role_first_and_the_usage_last(client):
    messages = CONVERSATIONS[1]
    whole = chat(client, {"messages": messages, "max_tokens": 16, "temperature": 0})
    r = post(client, "/v1/chat/completions", {"model": "chat", "messages": messages, "max_tokens": 16,
                                               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    first, *middle, last_choice, usage_chunk = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == whole["choices"][0]["message"]["content"]
    assert last_choice["choices"][0]["delta"] == {}
    assert last_choice["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    # without include_usage, no usage chunk
    r = post(client, "/v1/chat/completions", {"model": "chat", "messages": messages, "max_tokens": 4, "stream": True})
    assert all(c["choices"] for c in events(r.text))


def test_n_choices_decode_together_from_one_prefill(client, scheduler):
    prefills = scheduler.prefills
    body = chat(client, {"messages": CONVERSATIONS[4], "max_tokens": 12, "n": 4, "temperature": 1.5, "seed": 3})
    assert scheduler.prefills == prefills + 1  # the prompt was prefilled once for its four choices
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert body == {**chat(client, {"messages": CONVERSATIONS[4], "max_tokens": 12, "n": 4, "temperature": 1.5,
                                    "seed": 3}), "id": body["id"], "created": body["created"]}
    # choice 0 of a seeded request is what the same request with n=1 gets
    one = chat(client, {"messages": CONVERSATIONS[4], "max_tokens": 12, "temperature": 1.5, "seed": 3})
    assert one["choices"][0]["message"]["content"] == texts[0]
    assert 4 <= body["usage"]["completion_tokens"] <= 4 * 12


def test_n_choices_stream_with_their_indexes(client):
    r = post(client, "/v1/chat/completions", {"model": "chat", "messages": CONVERSATIONS[5], "max_tokens": 10,
                                               "n": 3, "temperature": 0, "stream": True})
    chunks = events(r.text)
    texts = {i: "" for i in range(3)}
    finishes = {}
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    whole = chat(client, {"messages": CONVERSATIONS[5], "max_tokens": 10, "temperature": 0})["choices"][0]
    assert set(texts.values()) == {whole["message"]["content"]} and set(finishes) == {0, 1, 2}


def test_a_stop_string_ends_one_choice_and_the_others_go_on(client):
    whole = chat(client, {"messages": CONVERSATIONS[0], "max_tokens": 30, "temperature": 0})
    text = whole["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    body = chat(client, {"messages": CONVERSATIONS[0], "max_tokens": 30, "temperature": 0, "stop": stop, "n": 2})
    for choice in body["choices"]:
        assert choice["message"]["content"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"


def test_completions_take_a_list_of_prompts_with_n_choices_each(client):
    prompts = ["The cat sat on", "Rain fell over the"]
    r = post(client, "/v1/completions", {"model": "gpt2", "prompt": prompts, "n": 2, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    alone = [post(client, "/v1/completions", {"model": "gpt2", "prompt": p, "max_tokens": 8, "temperature": 0}).json()
             for p in prompts]
    assert [c["text"] for c in body["choices"]] == [a["choices"][0]["text"] for a in alone for _ in range(2)]
    assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert body["usage"]["completion_tokens"] == 2 * sum(a["usage"]["completion_tokens"] for a in alone)


BAD = [
    ({"messages": []}, 422, "validation_error", "messages"),
    ({"messages": [{"role": "user"}]}, 422, "validation_error", "messages.0.content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "validation_error", "messages.0.role"),
    ({"messages": "hi"}, 422, "validation_error", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100_000}, 422, "validation_error",
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 422, "validation_error", "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 422, "validation_error", "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 422, "validation_error", "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 422, "validation_error", "temperature"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 413, "request_too_large", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "invalid_request_error", "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, 400, "invalid_request_error", "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "invalid_request_error", "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "invalid_request_error", "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400, "invalid_request_error",
     "frequency_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, "invalid_request_error", "messages.0.content.0.type"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}, 400, "invalid_request_error",
     "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt2"}, 400, "invalid_request_error", "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "minilm"}, 400, "invalid_request_error", "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "not_found_error", "model"),
]


@pytest.mark.parametrize("body,status,kind,param", BAD)
def test_bad_chat_requests_get_the_one_error_body(client, body, status, kind, param):
    for stream in (False, True):
        r = post(client, "/v1/chat/completions", {"model": "chat", **body, "stream": stream})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == kind and error["param"] == param and error["message"], error


def test_a_model_without_a_chat_template_says_how_to_add_one(client):
    r = post(client, "/v1/chat/completions", {"model": "gpt2", "messages": [{"role": "user", "content": "hi"}]})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "no chat template" in message and "chat_template" in message
    assert "bentoformers build --only gpt2" in message
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["chat"]["chat_template"] is True and models["gpt2"]["chat_template"] is False

"""The chat template as Transformers renders it: `apply_chat_template`'s token ids, token for token."""

from __future__ import annotations

import json
import shutil

import pytest

from bentoformers.runtime.chat import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    resolve_template,
)
from bentoformers.runtime.tokenizer import TextTokenizer

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# SmolLM2-Instruct's template shape: a default system message when the conversation has none.
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2's shape: the special tokens as variables, a system message folded into the first turn, and
# raise_exception for a conversation it refuses.
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = false %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "The cat sat on the mat."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where did the cat sit?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where did the cat sit?"},
        {"role": "assistant", "content": "On the mat."},
        {"role": "user", "content": "And the dog?  "},
    ],
    [{"role": "user", "content": "Numbers like 42 and émigré, 日本"}, {"role": "assistant", "content": "Yes."}],
]


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    from bentoformers.tools.tiny_models import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("chat") / "ckpt", CHATML_WITH_DEFAULT_SYSTEM, CHAT_TOKENS)


def _transformers_ids(folder, template, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return list(out["input_ids"] if isinstance(out, dict) else out)


@pytest.mark.parametrize("template", ["chatml_default_system", "llama2_style", "dialogpt"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendered_prompt_is_apply_chat_templates_token_for_token(chat_checkpoint, template, conversation,
                                                                  add_generation_prompt):
    text = {"chatml_default_system": CHATML_WITH_DEFAULT_SYSTEM, "llama2_style": LLAMA2_STYLE,
            "dialogpt": BUILTIN_TEMPLATES["dialogpt"]}[template]
    messages = CONVERSATIONS[conversation]
    ours = ChatTemplate.load(chat_checkpoint, text)
    tokenizer = TextTokenizer(chat_checkpoint, 128)
    ids = tokenizer.ids(ours.render(messages, add_generation_prompt), add_special_tokens=False)
    assert ids == _transformers_ids(chat_checkpoint, text, messages, add_generation_prompt)


def test_a_template_that_refuses_the_conversation_raises_its_message(chat_checkpoint):
    ours = ChatTemplate.load(chat_checkpoint, LLAMA2_STYLE)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_the_sandbox_refuses_a_hostile_template(chat_checkpoint):
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="unsafe|SecurityError"):
        ChatTemplate.load(chat_checkpoint, hostile).render([{"role": "user", "content": "x"}])


def test_the_template_comes_from_the_model_list_the_jinja_file_tokenizer_config_or_the_dialogpt_convention(
    chat_checkpoint, tmp_path
):
    # transformers writes chat_template.jinja beside the tokenizer
    assert resolve_template(chat_checkpoint, "local") == CHATML_WITH_DEFAULT_SYSTEM
    assert resolve_template(chat_checkpoint, "local", "chatml") == BUILTIN_TEMPLATES["chatml"]
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{{ messages[0]['content'] }}")
    assert resolve_template(chat_checkpoint, "local", str(jinja)) == "{{ messages[0]['content'] }}"

    older = shutil.copytree(chat_checkpoint, tmp_path / "older")
    (older / "chat_template.jinja").unlink()
    config = json.loads((older / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 'd' }}"}]
    (older / "tokenizer_config.json").write_text(json.dumps(config))
    assert resolve_template(older, "local") == "{{ 'd' }}"

    del config["chat_template"]
    (older / "tokenizer_config.json").write_text(json.dumps(config))
    assert resolve_template(older, "some/model") == ""
    assert resolve_template(older, "microsoft/DialoGPT-medium") == BUILTIN_TEMPLATES["dialogpt"]

"""The build puts the chat template into the artefact: the DialoGPT convention for a DialoGPT checkpoint without
one, the model list's template, and none for a plain causal LM (whose chat requests then get a 400)."""

from __future__ import annotations

import pytest

from bentoformers.build.builder import _card, build_model
from bentoformers.runtime.chat import BUILTIN_TEMPLATES
from bentoformers.spec import ModelSpec

# GPT2Tokenizer's default_chat_template in the Transformers releases that had one: what DialoGPT was chatted with.
DIALOGPT_TEMPLATE = "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"


@pytest.fixture(scope="module")
def dialogpt_checkpoint(tmp_path_factory):
    from bentoformers.tools.tiny_models import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("hub") / "DialoGPT-tiny")


def _spec(source, **extra):
    return ModelSpec(name="dialog", source=str(source), task="generation", variants=[{"precision": "fp32"}], **extra)


def test_a_dialogpt_checkpoint_chats_with_turns_joined_by_the_end_of_text_token(dialogpt_checkpoint):
    import bentoml
    from transformers import AutoTokenizer

    from bentoformers.build.export import reference_greedy
    from bentoformers.gateway.endpoint import GeneratorEndpoint
    from bentoformers.runtime.decoder import OnnxDecoder
    from bentoformers.settings import Settings

    (result,) = build_model(_spec(dialogpt_checkpoint), report=lambda _: None)
    assert result.ok, result.reason
    folder = bentoml.models.get(result.tag).path
    endpoint = GeneratorEndpoint(Settings(), folder, describe=None, stream=None, cancel=None)
    assert endpoint.card.chat_template == BUILTIN_TEMPLATES["dialogpt"]
    conversation = [{"role": "user", "content": "Does money buy happiness?"},
                    {"role": "assistant", "content": "Depends how much money you spend on it."},
                    {"role": "user", "content": "What is the best way to buy happiness?"}]
    ids = endpoint.tokenizer.ids(endpoint.chat.render(conversation), add_special_tokens=False)
    hf = AutoTokenizer.from_pretrained(dialogpt_checkpoint)
    expected = hf.apply_chat_template(conversation, chat_template=DIALOGPT_TEMPLATE, tokenize=True)
    assert ids == list(expected["input_ids"] if isinstance(expected, dict) else expected)
    assert ids.count(hf.eos_token_id) == 3 and ids[-1] == hf.eos_token_id  # each turn ends with <|endoftext|>
    # and the built graph continues it as the fp32 PyTorch model does
    assert OnnxDecoder(folder).greedy(ids, 8, (hf.eos_token_id,)) == reference_greedy(dialogpt_checkpoint, [ids], 8)[0]


def test_the_model_list_names_a_template_and_a_plain_checkpoint_has_none(tmp_path):
    from bentoformers.tools.tiny_models import make_tiny_gpt2

    plain = make_tiny_gpt2(tmp_path / "gpt2")
    assert _card(_spec(plain), plain).chat_template == ""
    assert _card(_spec(plain, chat_template="chatml"), plain).chat_template == BUILTIN_TEMPLATES["chatml"]
    assert _card(_spec(plain, chat_template="{{ 'x' }}"), plain).chat_template == "{{ 'x' }}"
    with pytest.raises(ValueError, match="generation models only"):
        ModelSpec(name="e", source=str(plain), task="embeddings", variants=[{"precision": "fp32"}], chat_template="chatml")

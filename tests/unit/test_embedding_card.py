"""What the model list and a checkpoint's sentence-transformers config put in an embedding model's card
(Matryoshka sizes, prompts, the default prompt), and what a request's prompt options pick from it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from bentoformers.api.embeddings import prompt_for
from bentoformers.build.builder import _card
from bentoformers.errors import ApiError
from bentoformers.runtime.card import ModelCard
from bentoformers.spec import ModelSpec

PROMPTS = {"query": "query: ", "passage": "passage: "}


def _checkpoint(folder, st_config=None):
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32, "max_position_embeddings": 128}))
    if st_config is not None:
        (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return folder


def _spec(**fields):
    return ModelSpec.model_validate({"name": "e5", "source": "x", "variants": [{"precision": "fp32"}], **fields})


def test_the_card_takes_the_checkpoints_prompts_and_the_lists_sizes(tmp_path):
    folder = _checkpoint(tmp_path, {"prompts": PROMPTS, "default_prompt_name": "query"})
    card = _card(_spec(matryoshka_dimensions=[8, 16]), folder)
    assert (card.dimensions, card.matryoshka_dimensions) == (32, (32, 16, 8))
    assert (card.prompts, card.default_prompt_name) == (PROMPTS, "query")
    card.save(tmp_path)
    assert ModelCard.load(tmp_path) == card  # the dict survives the round trip; the sizes come back a tuple
    # The model list's prompts replace the checkpoint's; its default holds only if it names one of them.
    replaced = _card(_spec(prompts={"search_query": "search_query: "}), folder)
    assert (replaced.prompts, replaced.default_prompt_name, replaced.matryoshka_dimensions) == (
        {"search_query": "search_query: "}, "", ())
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _card(_spec(), _checkpoint(plain)).prompts == {}


def test_sizes_over_the_hidden_size_and_an_unknown_default_prompt_fail_the_build(tmp_path):
    with pytest.raises(ValueError, match=r"\[64\] exceed the model's hidden size, 32"):
        _card(_spec(matryoshka_dimensions=[16, 64]), _checkpoint(tmp_path))
    folder = _checkpoint(tmp_path, {"prompts": PROMPTS, "default_prompt_name": "search"})
    with pytest.raises(ValueError, match="default_prompt_name 'search' is not one of its prompts"):
        _card(_spec(), folder)


@pytest.mark.parametrize("fields,words", [
    ({"matryoshka_dimensions": [16, 16]}, "distinct"),
    ({"matryoshka_dimensions": [0]}, "at least 1"),
    ({"prompts": {"": "x"}}, "may not be empty"),
    ({"task": "classification", "prompts": PROMPTS}, "embeddings models only"),
    ({"task": "generation", "matryoshka_dimensions": [8]}, "embeddings models only"),
])
def test_the_model_list_refuses_options_that_cannot_work(fields, words):
    with pytest.raises(ValidationError, match=words):
        _spec(**fields)


def _endpoint(default=""):
    card = ModelCard("e5", "embeddings", "fp32", 128, prompts=PROMPTS, default_prompt_name=default)
    tokenizer = SimpleNamespace(ids=lambda text: text.split())
    return SimpleNamespace(name="e5", card=card, tokenizer=tokenizer, settings=SimpleNamespace(max_chars_per_item=100))


def test_the_default_prompt_applies_unless_a_request_names_another_or_none():
    assert prompt_for(_endpoint("query"), None, None) == "query: "
    assert prompt_for(_endpoint("query"), "passage", None) == "passage: "
    assert prompt_for(_endpoint("query"), None, "") == ""
    assert prompt_for(_endpoint("query"), None, "Represent: ") == "Represent: "
    assert prompt_for(_endpoint(), None, None) == ""
    with pytest.raises(ApiError, match="not both"):
        prompt_for(_endpoint(), "query", "")

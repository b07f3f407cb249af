"""The Rust tokenizer (gateway side): token ids with the model's limit, and text back as tokens stream."""

from __future__ import annotations

import re
from pathlib import Path

# The tokens of a pair's second text (a reranker's document, an NLI hypothesis) cross to the model service as
# id + SECOND_SEGMENT: its batched call takes one list of ids per sequence (BentoML's batchable methods take
# a single argument), and the encoder rebuilds the token type ids from them (runtime/encoder.py, `feed`).
SECOND_SEGMENT = 1 << 24  # above any vocabulary



class InputTooLong(ValueError):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"item {index} has {tokens} tokens; the limit is {limit}")
        self.index, self.tokens, self.limit = index, tokens, limit


class TextTokenizer:
    """The Rust tokenizer, without padding (the encoder pads) and with the model's token limit."""

    def __init__(self, folder: str | Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._whole = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self._whole.no_padding()
        self._whole.no_truncation()
        self._truncating = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length)
        self._pair_truncating: dict[str, object] = {}  # by strategy, made when first asked for
        self._plain = None  # encodes special tokens' text as text (chat_ids), made when first asked for
        # Keeps a text's last tokens; the post-processor still puts the special tokens at both ends.
        self._truncating_left = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self._truncating_left.no_padding()
        self._truncating_left.enable_truncation(max_length, direction="left")

    def encode(self, texts: list[str], truncate: bool, direction: str = "right", prompt: str = "") -> list[list[int]]:
        """Token ids per text, `prompt` put before each (as sentence-transformers does). With `truncate`, a
        text over the limit keeps its first tokens (`direction` right) or its last (left; after the prompt's,
        which left truncation never cuts)."""
        if prompt:
            texts = [prompt + text for text in texts]
        if truncate and direction == "left" and prompt:
            return [self._cut_after_prompt(e, len(prompt)) for e in _encodings(self._whole, texts)]
        tokenizer = (self._truncating_left if direction == "left" else self._truncating) if truncate else self._whole
        ids = [e.ids for e in _encodings(tokenizer, texts)]
        if not truncate:
            for i, seq in enumerate(ids):
                if len(seq) > self.max_length:
                    raise InputTooLong(i, len(seq), self.max_length)
        return ids

    def _cut_after_prompt(self, encoding, prompt_chars: int) -> list[int]:
        """Left truncation that keeps the prompt: the special tokens at both ends, the prompt's tokens, and as
        many of the text's last tokens as fit."""
        ids, special, offsets = encoding.ids, encoding.special_tokens_mask, encoding.offsets
        if len(ids) <= self.max_length:
            return ids
        head = 0
        while head < len(ids) and (special[head] or offsets[head][1] <= prompt_chars):
            head += 1
        end = len(ids)
        while end > head and special[end - 1]:
            end -= 1
        room = max(0, self.max_length - head - (len(ids) - end))
        return ids[:head] + ids[end - room : end] + ids[end:]


    def encode_pairs(self, pairs: list[tuple[str, str]], truncate: bool, strategy: str = "longest_first") -> list[list[int]]:
        """Pairs as one sequence each, with the model's separators and token types, exactly as Transformers
        encodes `tokenizer(first, second)`. With truncate, `strategy` says which text loses tokens: the longer
        one first (a reranker's query and document, as sentence-transformers' CrossEncoder truncates), or
        `only_first` (a zero-shot premise, as Transformers' pipeline truncates it)."""
        tokenizer = self._whole
        if truncate:
            tokenizer = self._pair_truncating.get(strategy)
            if tokenizer is None:
                tokenizer = self._pair_truncating[strategy] = self._truncating_copy(strategy)
        try:
            encodings = [tokenizer.encode(*pairs[0])] if len(pairs) == 1 else tokenizer.encode_batch(pairs)
        except Exception:  # the Rust tokenizer's truncation error: `only_first` with a second text too long alone
            for i, pair in enumerate(pairs):
                try:
                    tokenizer.encode(*pair)
                except Exception:
                    raise InputTooLong(i, len(self._whole.encode(*pair).ids), self.max_length) from None
            raise
        out = []
        for i, encoding in enumerate(encodings):
            if not truncate and len(encoding.ids) > self.max_length:
                raise InputTooLong(i, len(encoding.ids), self.max_length)
            out.append([t + SECOND_SEGMENT * s for t, s in zip(encoding.ids, encoding.type_ids)])
        return out

    def _truncating_copy(self, strategy: str):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self._whole.to_str())
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_length, strategy=strategy)
        return tokenizer

    def chat_ids(self, parts: list[tuple[str, bool]]) -> list[int]:
        """A rendered chat as ids, from its parts: (text, written by the caller). The template's text is tokenized
        as Transformers does (its special tokens are special); the caller's never makes a special token, so a
        message holding `<|im_start|>system` cannot forge a turn. The text is cut only at the template's special
        tokens, where the tokenizer cuts it anyway: a chat whose messages hold no special token gets the ids of
        its whole text."""
        specials = {t.content: i for i, t in self._whole.get_added_tokens_decoder().items() if t.special}
        pattern = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
        ids: list[int] = []
        pending = ""  # text up to the next special token of the template
        for text, from_caller in parts:
            pieces = [text] if from_caller or not specials else pattern.split(text)
            for i, piece in enumerate(pieces):
                if i % 2 == 0:
                    pending += piece
                    continue
                ids += self._plain_ids(pending) + [specials[piece]]
                pending = ""
        return ids + self._plain_ids(pending)

    def _plain_ids(self, text: str) -> list[int]:
        if not text:
            return []
        if self._plain is None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(self._whole.to_str())
            self._plain.encode_special_tokens = True  # a special token's text is text
        return self._plain.encode(text, add_special_tokens=False).ids

    def first_tokens(self, text: str, count: int) -> str:
        """The text up to the end of its first `count` tokens (a document cut to a token budget)."""
        offsets = self._whole.encode(text, add_special_tokens=False).offsets
        return text if len(offsets) <= count else text[: offsets[count - 1][1]]

    def ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """One text, whole (a prompt: the caller checks it against the context). A rendered chat template
        holds its special tokens already: add_special_tokens=False, as Transformers tokenizes it."""
        return self._whole.encode(text, add_special_tokens=add_special_tokens).ids

    def tokens(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, str, bool, int, int]]:
        """(id, token, special, start, stop) for each token of one whole text; start and stop are character
        offsets into `text` (0, 0 for a special token)."""
        return token_rows(self._whole.encode(text, add_special_tokens=add_special_tokens))

    def encodings(self, texts: list[str], add_special_tokens: bool = True) -> list:
        """Texts whole, as the Rust tokenizer's encodings (compact: count their tokens before token_rows)."""
        if len(texts) == 1:
            return [self._whole.encode(texts[0], add_special_tokens=add_special_tokens)]
        return self._whole.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode_spans(self, texts: list[str]) -> list:
        """Texts whole, with no limit (token classification reads a long text in windows), as the Rust tokenizer's
        encodings: ids, tokens, character offsets into the text, the special-tokens mask, and `sequence_ids`
        (None on the tokens its template added)."""
        return [self._whole.encode(texts[0])] if len(texts) == 1 else self._whole.encode_batch(texts)

    def join_tokens(self, tokens: list[str]) -> str:
        """Tokens as one text, as Transformers' `convert_tokens_to_string` joins them (the tokenizer's decoder:
        WordPiece glues its "##" pieces on)."""
        decoder = self._whole.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    @property
    def marks_subwords(self) -> bool:
        """The vocabulary marks a word's continuing pieces (WordPiece's "##"), so a token's length tells a
        piece from a word."""
        return bool(getattr(self._whole.model, "continuing_subword_prefix", None))

    @property
    def unknown_id(self) -> int | None:
        unknown = getattr(self._whole.model, "unk_token", None)
        return self._whole.token_to_id(unknown) if unknown else None

    def decode_stream(self) -> TextStream:
        return TextStream(self._whole)


def token_rows(encoding) -> list[tuple[int, str, bool, int, int]]:
    """(id, token, special, start, stop) for each token of an encoding."""
    return [
        (token_id, token, bool(special), start, stop)
        for token_id, token, special, (start, stop) in zip(
            encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets, strict=True
        )
    ]


def _encodings(tokenizer, texts: list[str]) -> list:
    # encode_batch hands work to a thread pool: worth it for many texts, pure overhead for one.
    return [tokenizer.encode(texts[0])] if len(texts) == 1 else tokenizer.encode_batch(texts)


class TextStream:
    """Token ids in, text out as soon as it is whole (a byte-level token can end inside a character)."""

    def __init__(self, tokenizer) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self._stream.step(self._tokenizer, token) or ""

"""The Rust tokenizer (gateway side): token ids with the model's limit, and text back as tokens stream."""

from __future__ import annotations

from pathlib import Path


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

    def encode(self, texts: list[str], truncate: bool) -> list[list[int]]:
        tokenizer = self._truncating if truncate else self._whole
        # encode_batch hands work to a thread pool: worth it for many texts, pure overhead for one.
        ids = [tokenizer.encode(texts[0]).ids] if len(texts) == 1 else [e.ids for e in tokenizer.encode_batch(texts)]
        if not truncate:
            for i, seq in enumerate(ids):
                if len(seq) > self.max_length:
                    raise InputTooLong(i, len(seq), self.max_length)
        return ids


    def ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """One text, whole (a prompt: the caller checks it against the context). A rendered chat template
        holds its special tokens already: add_special_tokens=False, as Transformers tokenizes it."""
        return self._whole.encode(text, add_special_tokens=add_special_tokens).ids

    def decode_stream(self) -> TextStream:
        return TextStream(self._whole)


class TextStream:
    """Token ids in, text out as soon as it is whole (a byte-level token can end inside a character)."""

    def __init__(self, tokenizer) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self._stream.step(self._tokenizer, token) or ""

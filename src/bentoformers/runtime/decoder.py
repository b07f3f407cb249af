"""A causal LM exported with its KV cache (optimum's decoder graph), run with ONNX Runtime and numpy only.

The graph takes `input_ids`, `attention_mask`, `position_ids` and `past_key_values.<layer>.key|value`
(batch, heads, past length, head size) and returns `logits` and `present.*` (the cache one token longer).
A prompt is prefilled alone; decoding steps then run for many sequences together: their caches are
left-padded to one length and the padding is masked. Padding moves the attention sums by a rounding
error only: fp32 greedy tokens do not depend on the neighbours; int8 can turn that error into a
quantization step and flip a greedy near-tie (README, "Generation and batching").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bentoformers.runtime.card import ONNX_FILE
from bentoformers.runtime.session import open_session


@dataclass
class DecodeBatch:
    """The caches of the sequences decoding together; row i belongs to sequence i."""

    past: list[np.ndarray]  # one (rows, heads, length, head size) array per cache input
    mask: np.ndarray  # (rows, length): 1 where the cache holds a real token
    positions: np.ndarray  # (rows,): the position of each row's next token

    @property
    def rows(self) -> int:
        return len(self.positions)

    def keep(self, rows: list[int]) -> DecodeBatch:
        batch = DecodeBatch([p[rows] for p in self.past], self.mask[rows], self.positions[rows])
        return batch.trimmed()

    def trimmed(self) -> DecodeBatch:
        """Drops leading columns that no row uses (after a long sequence left)."""
        used = np.flatnonzero(self.mask.any(axis=0))
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start == 0:
            return self
        return DecodeBatch([p[:, :, start:] for p in self.past], self.mask[:, start:], self.positions)

    @staticmethod
    def join(a: DecodeBatch | None, b: DecodeBatch) -> DecodeBatch:
        if a is None or a.rows == 0:
            return b
        width = max(a.mask.shape[1], b.mask.shape[1])
        a, b = a.left_padded(width), b.left_padded(width)
        return DecodeBatch(
            [np.concatenate([x, y]) for x, y in zip(a.past, b.past)],
            np.concatenate([a.mask, b.mask]),
            np.concatenate([a.positions, b.positions]),
        )

    def left_padded(self, width: int) -> DecodeBatch:
        pad = width - self.mask.shape[1]
        if pad == 0:
            return self
        past = [np.pad(p, ((0, 0), (0, 0), (pad, 0), (0, 0))) for p in self.past]
        return DecodeBatch(past, np.pad(self.mask, ((0, 0), (pad, 0))), self.positions)


class OnnxDecoder:
    def __init__(self, folder: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.device = device
        self.session = open_session(Path(folder) / ONNX_FILE, device, intra_op_threads=threads or 0)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_positions = "position_ids" in inputs
        first = inputs[self.past_names[0]]
        self.heads, self.head_size = int(first.shape[1]), int(first.shape[3])
        self.cache_dtype = np.float16 if first.type == "tensor(float16)" else np.float32

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]):
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past_names, past))}
        if self.has_positions:
            feed["position_ids"] = positions
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits, present

    def prefill(self, prompt: list[int]) -> tuple[np.ndarray, DecodeBatch]:
        """Runs one prompt alone: the logits for its next token, and its cache as a one-row batch."""
        n = len(prompt)
        empty = [np.zeros((1, self.heads, 0, self.head_size), self.cache_dtype) for _ in self.past_names]
        logits, present = self._run(
            np.array([prompt], np.int64), np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], empty
        )
        return logits[0, -1].astype(np.float32), DecodeBatch(present, np.ones((1, n), np.int64), np.array([n]))

    def step(self, batch: DecodeBatch, tokens: np.ndarray) -> tuple[np.ndarray, DecodeBatch]:
        """One new token per row: the logits for each row's next token, and the cache with it appended."""
        mask = np.concatenate([batch.mask, np.ones((batch.rows, 1), np.int64)], axis=1)
        logits, present = self._run(
            tokens.astype(np.int64)[:, None], mask, batch.positions[:, None].astype(np.int64), batch.past
        )
        return logits[:, -1].astype(np.float32), DecodeBatch(present, mask, batch.positions + 1)

    def greedy(self, prompt: list[int], new_tokens: int, eos_token_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy continuation of one prompt (the build step checks it against PyTorch's)."""
        logits, batch = self.prefill(prompt)
        out: list[int] = []
        while True:
            token = int(np.argmax(logits))
            out.append(token)
            if token in eos_token_ids or len(out) >= new_tokens:
                return out
            logits, batch = self.step(batch, np.array([token]))

"""One row per task: what the build, the model services and the gateway need to know of it, declared once.

A new task is a new row here, plus its reference and comparison (build/builder.py, runtime/selfcheck.py) and its
routes (api/). Nothing here imports the rest of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Task = Literal["embeddings", "classification", "rerank", "token-classification", "generation", "sparse-embeddings"]
# What the graph gives per input: a pooled vector, a row of logits, logits per token, new tokens, or a weight per
# vocabulary term (SPLADE).
Output = Literal["pooled", "logits", "token-logits", "tokens", "sparse"]


@dataclass(frozen=True)
class TaskRow:
    name: Task
    export: str  # optimum's export task
    output: Output
    method: str | None  # the model service's batched method; None: it streams tokens (generation)
    labelled: bool  # the card names the checkpoint's labels (its id2label)
    # Fidelity gates against the fp32 PyTorch reference, per precision; a variant below them is not saved.
    gates: dict[str, dict[str, float]]
    describe: Callable[[Any], dict[str, Any]]  # the card's fields that /v1/models shows
    summary: Callable[[Any], str]  # the card's task line in the model card (README.md of the variant)
    # embeddings: per quantized output type, the least retrieval figure against float on held-out texts
    # (build/builder.py, output_figures); a type below it is not offered by that model.
    output_gates: dict[str, float] | None = None

    @property
    def decoder(self) -> bool:
        return self.output == "tokens"

    @property
    def ragged(self) -> bool:
        """Its outputs differ in length per input (the check set stores them as lists)."""
        return self.output in ("tokens", "token-logits")


def _embedding_line(card: Any) -> str:
    line = f"{card.pooling} pooling; normalised: {card.normalize}; {card.dimensions} dimensions"
    if card.matryoshka_dimensions:
        line += f" (Matryoshka: {', '.join(map(str, card.matryoshka_dimensions))})"
    if card.prompts:
        line += f"; prompts: {', '.join(card.prompts)}"
    return line + (f" (default: {card.default_prompt_name})" if card.default_prompt_name else "")


def _classification_line(card: Any) -> str:
    kind = "multi-label (sigmoid)" if card.multi_label else "single-label (softmax)"
    zero_shot = f"; zero-shot (NLI, entailment: {card.labels[card.entailment_index]})" if card.entailment_index >= 0 else ""
    return f"{kind}; labels: {', '.join(card.labels)}{zero_shot}"


_ENCODER_GATES = {
    "fp32": {"label_agreement": 1.0, "max_prob_diff": 1e-4},
    "fp16": {"label_agreement": 0.99, "max_prob_diff": 0.01},
    "int8": {"label_agreement": 0.99, "max_prob_diff": 0.1},
}

# embeddings: cosine and nearest-neighbour overlap on the shipped sentences;
# classification: top-label agreement and the largest probability difference on the shipped sentences
#   (premise/hypothesis pairs for an NLI model, the zero-shot classifier);
# rerank: per query, the top document and Kendall's tau of the order, on the shipped query/document sets,
#   and the largest difference of a relevance score (the sigmoid of the logit);
# token-classification: each real token's top label, and the largest probability difference;
# generation: greedy tokens that agree (up to each prompt's first divergence) on fixed prompts.
TASKS: dict[str, TaskRow] = {row.name: row for row in (
    TaskRow(
        "embeddings", "feature-extraction", "pooled", "embed", labelled=False,
        gates={
            "fp32": {"min_cosine": 0.9999, "mean_cosine": 0.99999, "neighbour_overlap": 0.99},
            "fp16": {"min_cosine": 0.999, "mean_cosine": 0.9999, "neighbour_overlap": 0.95},
            "int8": {"min_cosine": 0.99, "mean_cosine": 0.998, "neighbour_overlap": 0.95},
        },
        describe=lambda card: {
            "dimensions": card.dimensions, "matryoshka_dimensions": list(card.matryoshka_dimensions),
            "prompts": card.prompts, "default_prompt_name": card.default_prompt_name or None,
            "max_input_tokens": card.max_length,
            "embedding_types": ["float", "base64", *(k for k, f in card.output_types.items() if f["offered"])],
            "quantized_outputs": card.output_types,
        },
        summary=_embedding_line,
        # int8/uint8: recall@10 of the dequantized vectors; binary/ubinary: Hamming top 40 rescored with floats.
        output_gates={"int8": 0.97, "uint8": 0.97, "binary": 0.95, "ubinary": 0.95},
    ),
    TaskRow(
        "classification", "text-classification", "logits", "classify", labelled=True, gates=_ENCODER_GATES,
        describe=lambda card: {
            "labels": list(card.labels), "multi_label": card.multi_label, "max_input_tokens": card.max_length,
            "zero_shot": card.entailment_index >= 0,
        },
        summary=_classification_line,
    ),
    TaskRow(
        "rerank", "text-classification", "logits", "score", labelled=True,
        gates={
            "fp32": {"top1_agreement": 1.0, "kendall_tau": 0.999, "max_score_diff": 1e-4},
            "fp16": {"top1_agreement": 0.99, "kendall_tau": 0.95, "max_score_diff": 0.01},
            "int8": {"top1_agreement": 0.99, "kendall_tau": 0.95, "max_score_diff": 0.1},
        },
        describe=lambda card: {"max_input_tokens": card.max_length},  # a query and a document together
        summary=lambda card: "cross-encoder: a relevance score per query/document pair (the sigmoid of its logit)",
    ),
    TaskRow(
        "token-classification", "token-classification", "token-logits", "classify_tokens", labelled=True,
        gates=_ENCODER_GATES,
        describe=lambda card: {"labels": list(card.labels), "max_input_tokens": card.max_length},
        summary=lambda card: f"a label per token; labels: {', '.join(card.labels)}",
    ),
    # SPLADE (a *ForMaskedLM checkpoint): per text, log(1 + relu(logits)) max-pooled over its tokens, a weight
    # per vocabulary term (the max and relu in the graph, log1p after it: build/export.py append_splade_pooling).
    # Gates against sentence-transformers' SparseEncoder: the largest weight difference, the overlap of each
    # text's top 32 terms, and the dot-product ranking's top 10 (shipped sentences as queries and documents).
    TaskRow(
        "sparse-embeddings", "fill-mask", "sparse", "embed_sparse", labelled=False,
        gates={
            "fp32": {"max_weight_diff": 1e-5, "top_terms_overlap": 0.999, "dot_recall_at_10": 0.99},
            "fp16": {"max_weight_diff": 0.05, "top_terms_overlap": 0.95, "dot_recall_at_10": 0.95},
            "int8": {"max_weight_diff": 0.5, "top_terms_overlap": 0.95, "dot_recall_at_10": 0.95},
        },
        describe=lambda card: {"vocab_size": card.dimensions, "max_input_tokens": card.max_length},
        summary=lambda card: f"SPLADE: max-pooled log(1 + relu(logits)), a weight per term of {card.dimensions}",
    ),
    # The decoder with its KV cache: one merged graph that takes an empty cache for the prompt and the
    # growing cache for each new token.
    TaskRow(
        "generation", "text-generation-with-past", "tokens", None, labelled=False,
        gates={"fp32": {"token_agreement": 1.0}, "fp16": {"token_agreement": 0.9}, "int8": {"token_agreement": 0.8}},
        describe=lambda card: {"context_length": card.max_length},
        summary=lambda card: "causal LM with KV cache",
    ),
)}

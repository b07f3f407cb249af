"""What a chat answer must be: conversations, and in-process greedy decoding of the prompt Transformers renders."""

from __future__ import annotations

CONVERSATIONS = [
    [{"role": "user", "content": "The cat sat on"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where did the cat sit?"}],
    [{"role": "user", "content": "Rain fell over the"}, {"role": "assistant", "content": "city."},
     {"role": "user", "content": [{"type": "text", "text": "And then "}, {"type": "text", "text": "what?"}]}],
    [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "She opened the door and"}],
    [{"role": "user", "content": "A good"}],
    [{"role": "user", "content": "Numbers like 42 and"}],
    [{"role": "user", "content": "The river"}, {"role": "assistant", "content": "ran"}, {"role": "user", "content": "on"}],
    [{"role": "system", "content": "You count."}, {"role": "user", "content": "One, two,"}],
]


def expected_greedy(chat_folder, messages, new_tokens):
    """In-process greedy decoding (fp32) of the prompt that transformers' apply_chat_template gives."""
    from transformers import AutoTokenizer

    from bentoformers.runtime.card import ModelCard
    from bentoformers.runtime.decoder import OnnxDecoder
    from bentoformers.runtime.tokenizer import TextTokenizer

    hf = AutoTokenizer.from_pretrained(chat_folder)
    plain = [{"role": "system" if m["role"] == "developer" else m["role"],
              "content": m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])}
             for m in messages]
    ids = hf.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    card = ModelCard.load(chat_folder)
    tokens = OnnxDecoder(chat_folder).greedy(ids, new_tokens, card.eos_token_ids)
    stream = TextTokenizer(chat_folder, card.max_length).decode_stream()
    text = "".join(stream.step(t) for t in tokens if t not in card.eos_token_ids)
    finish = "stop" if tokens[-1] in card.eos_token_ids else "length"
    return text, finish, len(ids)

"""A checkpoint's chat template, rendered as Transformers renders it (`apply_chat_template`).

The template is Jinja, run in Jinja's immutable sandbox (a template from a checkpoint is untrusted code),
with Transformers' options (`trim_blocks`, `lstrip_blocks`, `loopcontrols`), its `tojson`,
`raise_exception` and `strftime_now`, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
as variables. The rendered text is then tokenized without adding special tokens: the template placed them.

Where the template comes from (the build resolves it into the model card): the model list's
`chat_template`, else the checkpoint's `chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template`, else, for DialoGPT checkpoints, the DialoGPT convention (every turn followed by the
end-of-text token, as DialoGPT was trained).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

# Named templates the model list can ask for instead of writing one.
BUILTIN_TEMPLATES = {
    "dialogpt": "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}",
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`), or failed to render it."""


def resolve_template(folder: Path, source: str, named: str | None = None) -> str:
    """The template text for a checkpoint folder: `named` (a built-in name, a .jinja file, or Jinja text),
    else the checkpoint's own, else the DialoGPT convention for a DialoGPT source, else ""."""
    if named:
        if named in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[named]
        if named.endswith(".jinja"):
            return Path(named).expanduser().read_text(encoding="utf-8")
        return named
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = _json(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default")
    if isinstance(template, str) and template:
        return template
    if re.search(r"dialogpt", source, re.IGNORECASE):
        return BUILTIN_TEMPLATES["dialogpt"]
    return ""


def special_tokens(folder: Path) -> dict[str, Any]:
    """The tokenizer's special tokens by name, as strings (Transformers' `special_tokens_map`)."""
    found: dict[str, Any] = {}
    for source in (_json(folder / "special_tokens_map.json"), _json(folder / "tokenizer_config.json")):
        for name in (*SPECIAL_TOKEN_NAMES, "additional_special_tokens"):
            value = source.get(name)
            if name not in found and value is not None:
                found[name] = [_content(v) for v in value] if isinstance(value, list) else _content(value)
    return found


class ChatTemplate:
    def __init__(self, template: str, tokens: dict[str, Any]) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(template)
        self.tokens = tokens

    @classmethod
    def load(cls, folder: str | Path, template: str) -> ChatTemplate:
        return cls(template, special_tokens(Path(folder)))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self.tokens,
            )
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None
        except Exception as exc:  # the template is the checkpoint's code: any failure is its refusal
            raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from None


    def render_parts(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """The rendering as parts, (text, written by the caller): each message's content apart from the template's
        text, so that the tokenizer keeps the caller's text from making special tokens (TextTokenizer.chat_ids).
        The template renders a marker in place of each content. One that renders a content more than once gets
        the whole rendering as the template's, or a refusal where a content holds a special token's text."""
        markers = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = self.render([{**m, "content": k} for m, k in zip(messages, markers, strict=True)], add_generation_prompt)
        pieces = _MARKER.split(marked)  # text, index, text, index, ..., text
        indices = pieces[1::2]
        if len(set(indices)) == len(indices):
            return [(messages[int(p)]["content"], True) if i % 2 else (p, False) for i, p in enumerate(pieces) if p]
        specials = [t for v in self.tokens.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, str) and t]
        for m in messages:
            if any(t in m["content"] for t in specials):
                raise ChatTemplateError("a message holds a special token's text, which this template cannot keep apart")
        return [(self.render(messages, add_generation_prompt), False)]


_MARKER = re.compile("\ue000([0-9]+)\ue001")


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Transformers' own: Jinja's escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _content(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

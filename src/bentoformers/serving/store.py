"""What the BentoML model store holds for a served model, and which variant to run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bentoformers.settings import Settings
from bentoformers.spec import load_model_list, store_name

PRECISIONS = ("fp16", "int8", "fp32")


@dataclass(frozen=True)
class StoredModel:
    name: str
    task: str
    variants: dict[str, str]  # {precision: tag}

    @property
    def attribute(self) -> str:
        """This model's Python identifier on the gateway class (its model service dependency).

        Model names may hold `-`, `.` and `_`; each is spelled by its code point (`a-b` -> `model_a_2db`,
        `a.b` -> `model_a_2eb`), so distinct names never meet, and no name can end in `__files`.
        """
        return "model_" + re.sub(r"[^a-z0-9]", lambda m: f"_{ord(m.group()):02x}", self.name)

    @property
    def files_attribute(self) -> str:
        """The gateway's handle on this model's stored files (card and tokenizer)."""
        return f"{self.attribute}__files"


def check_attributes_unique(models: list[StoredModel]) -> None:
    names = [a for m in models for a in (m.attribute, m.files_attribute)]
    if len(names) != len(set(names)):
        raise RuntimeError(f"served model names collide as Python identifiers: {sorted(m.name for m in models)}")


def served_models(settings: Settings, base: Path | None = None) -> list[StoredModel]:
    """The models to serve, in model-list order: the names the settings give, else every built entry.

    A relative model list is found under `base` (default: the working directory).
    """
    wanted = settings.served_names()
    if wanted:
        return [_stored(name) for name in wanted]
    names = [spec.name for spec in load_model_list((base or Path()) / settings.model_list)]
    found = []
    for name in names:
        try:
            found.append(_stored(name))
        except RuntimeError:
            continue
    if not found:
        raise RuntimeError(
            f"no entry of {settings.model_list} is built in the BentoML model store; run `bentoformers build` first"
        )
    return found


def _stored(name: str) -> StoredModel:
    import bentoml

    variants = stored_variants(name)
    task = bentoml.models.get(next(iter(variants.values()))).info.labels.get("task", "embeddings")
    return StoredModel(name, task, variants)


def stored_variants(model: str) -> dict[str, str]:
    """{precision: "name-precision:version"} of the latest stored build of each variant."""
    import bentoml
    from bentoml.exceptions import NotFound

    found: dict[str, str] = {}
    for precision in PRECISIONS:
        try:
            found[precision] = str(bentoml.models.get(f"{store_name(model, precision)}:latest").tag)
        except NotFound:
            continue
    if not found:
        raise RuntimeError(
            f"no built variant of model {model!r} in the BentoML model store; run `bentoformers build` first"
        )
    return found


def candidate_precisions(available: dict[str, str] | list[str], device: str, requested: str = "auto") -> list[str]:
    """The variants to try, best first: each must pass its start-up check on this machine, else the next is tried.

    A forced precision is the only candidate (it serves or the service refuses to start).
    """
    if requested != "auto":
        if requested not in available:
            raise RuntimeError(f"precision {requested!r} was asked for but only {sorted(available)} are built")
        return [requested]
    preference = ("fp16", "fp32", "int8") if device == "cuda" else ("int8", "fp32")
    found = [p for p in preference if p in available]
    if not found:
        raise RuntimeError(f"no variant runs on {device}: built {sorted(available)}")
    return found


def choose_precision(available: dict[str, str] | list[str], device: str, requested: str = "auto") -> str:
    """The variant a machine of this device serves when every candidate holds."""
    return candidate_precisions(available, device, requested)[0]

"""What the BentoML model store holds for a served model, and which variant to run."""

from __future__ import annotations

from .spec import store_name

PRECISIONS = ("fp16", "int8", "fp32")


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


def choose_precision(available: dict[str, str] | list[str], device: str, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in available:
            raise RuntimeError(f"precision {requested!r} was asked for but only {sorted(available)} are built")
        return requested
    preference = ("fp16", "fp32", "int8") if device == "cuda" else ("int8", "fp32")
    for precision in preference:
        if precision in available:
            return precision
    raise RuntimeError(f"no variant runs on {device}: built {sorted(available)}")

"""Test tiers by folder: unit (no model), build (real build step), inprocess (the app in process), e2e (real server).

Every run gets its own BentoML home, so the store starts empty and the real build step fills it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports bentoml, which reads these at import.
_RUN_DIR = Path(tempfile.mkdtemp(prefix="bentoformers-tests-"))
os.environ["BENTOML_HOME"] = str(_RUN_DIR / "bentoml")
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_RUN_DIR / "prometheus"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minilm_build():
    """The real build step on the default model list (MiniLM from its PyPI package)."""
    from bentoformers.builder import build_model
    from bentoformers.spec import load_model_list

    (spec,) = [s for s in load_model_list(ROOT / "build" / "models.yaml") if s.name == "minilm"]
    return {r.precision: r for r in build_model(spec)}


@pytest.fixture(scope="session")
def minilm_path(minilm_build):
    import bentoml

    return {p: Path(bentoml.models.get(r.tag).path) for p, r in minilm_build.items() if r.ok}


@pytest.fixture(scope="session")
def sentences():
    from bentoformers.fidelity import shipped_sentences

    return shipped_sentences()

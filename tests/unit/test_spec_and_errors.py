import orjson
import pytest
from helpers import ROOT
from pydantic import ValidationError

from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.runtime.encoder import OnnxEncoder
from bentoformers.security.identity import TASKS
from bentoformers.spec import ModelSpec, load_model_list


def test_shipped_model_list_is_valid():
    specs = load_model_list(ROOT / "build" / "models.yaml")
    assert specs[0].name == "minilm"
    assert {v.precision for v in specs[0].variants} >= {"fp32", "int8"}


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "x", "source": "s", "variants": []},
        {"name": "x", "source": "s", "variants": [{"precision": "int8"}, {"precision": "int8"}]},
        {"name": "x", "source": "s", "variants": [{"precision": "int4"}]},
        {"name": "X Y", "source": "s", "variants": [{"precision": "fp32"}]},
        {"name": "x", "source": "s", "varients": [{"precision": "fp32"}]},
    ],
)
def test_model_list_mistakes_are_refused(bad):
    with pytest.raises(ValidationError):
        ModelSpec.model_validate(bad)


def test_error_body_is_the_openai_shape():
    response = error_response(ApiError(ErrorType.TOO_LARGE, "too many", param="input", headers={"X-A": "1"}))
    assert response.status_code == 413
    assert orjson.loads(response.body) == {"error": {"type": "request_too_large", "message": "too many", "param": "input"}}
    assert response.headers["x-a"] == "1"


def test_length_plan_keeps_padding_small_and_respects_the_token_budget():
    encoder = OnnxEncoder.__new__(OnnxEncoder)
    encoder.max_batch_tokens, encoder.workers = 64, 1
    batch = [[1] * n for n in (30, 5, 6, 31, 7, 29, 100)]
    groups = encoder._plan(batch)
    assert sorted(i for g in groups for i in g) == list(range(len(batch)))
    for g in groups:
        lengths = [len(batch[i]) for i in g]
        assert len(g) == 1 or (max(lengths) * len(g) <= 64 and max(lengths) <= min(lengths) * 1.25 + 4)


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_the_plan_gives_every_worker_a_sub_batch_when_there_are_texts_enough(workers):
    encoder = OnnxEncoder.__new__(OnnxEncoder)
    encoder.max_batch_tokens, encoder.workers = 2048, workers
    batch = [[1] * n for n in (20, 21, 22, 20, 23, 21, 20, 22)]  # one group by length and budget
    groups = encoder._plan(batch)
    assert len(groups) == workers and sorted(i for g in groups for i in g) == list(range(len(batch)))
    assert max(map(len, groups)) - min(map(len, groups)) <= len(batch) // workers  # halves, not crumbs
    assert len(encoder._plan([[1] * 30])) == 1  # a lone text stays whole
    # a long lone text is not what stops the halving: the short ones are shared out
    parts = encoder._plan([[1] * 500] + [[1] * 10] * 30)
    assert len(parts) == workers and sorted(i for g in parts for i in g) == list(range(31))


def test_model_names_never_collide_as_gateway_attributes():
    from bentoformers.serving.store import StoredModel, check_attributes_unique

    names = ["a-b", "a.b", "a_b", "ab", "x", "x_files", "x__files", "x-files"]
    models = [StoredModel(n, "embeddings", {}) for n in names]
    attributes = [a for m in models for a in (m.attribute, m.files_attribute)]
    assert len(set(attributes)) == len(attributes) and all(a.isidentifier() for a in attributes)
    check_attributes_unique(models)
    with pytest.raises(RuntimeError, match="collide"):
        check_attributes_unique([models[0], StoredModel("a-b", "classification", {})])


def test_the_app_routes_exactly_the_route_table():
    from starlette.routing import Route

    from bentoformers.api.app import HANDLERS, create_app
    from bentoformers.api.routes import DOC_PATHS, ROUTE_TASKS, ROUTES

    app = create_app()
    served = {(r.path, m) for r in app.routes if isinstance(r, Route) and "{" not in r.path for m in r.methods - {"HEAD"}}
    # Plus the metrics page, which the app serves in place of BentoML's (observability/scrape.py), and the API's
    # description (OpenAPI, /docs), which answers outside the route table: no credentials.
    assert served == {(r.path, r.method) for r in ROUTES} | {("/metrics", "GET")} | {
        (p, "GET") for p in DOC_PATHS - {"/schema.json"}
    }
    assert set(HANDLERS) == {r.handler for r in ROUTES}
    assert set(ROUTE_TASKS.values()) == set(TASKS)


def test_the_package_has_no_import_cycle():
    """Module-level imports between bentoformers modules form no cycle (function-local imports aside)."""
    import ast

    package = ROOT / "src" / "bentoformers"
    files = {".".join(p.with_suffix("").relative_to(package.parent).parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bentoformers"):
                deps |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        graph[name] = {d for d in deps if d in files and d != name}

    def visit(node: str, path: tuple[str, ...]) -> None:
        for dep in graph[node]:
            assert dep not in path, "import cycle: " + " -> ".join((*path[path.index(dep):], dep))
            visit(dep, (*path, dep))

    for name in graph:
        visit(name, (name,))

"""The OpenAPI document and BentoML's client schema, from the route table: valid, complete, and true to the app."""

from __future__ import annotations

import jsonschema
import pytest
from starlette.routing import Route

from bentoformers.api.app import create_app
from bentoformers.api.openapi import bentoml_schema, openapi_document
from bentoformers.api.routes import DOC_PATHS, PROBE_PATHS, ROUTES
from bentoformers.errors import STATUS, ErrorType, error_body


@pytest.fixture(scope="module", params=[True, False], ids=["secured", "open"])
def document(request):
    return openapi_document(secured=request.param)


def test_the_document_is_valid_openapi_3_1(document):
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    assert document["openapi"] == "3.1.0"
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_document_and_the_app_agree(document):
    """Every route the app answers is documented with its method, and nothing else is (but the files of the
    /docs page); BentoML's probes and /schema.json too."""
    app = create_app()
    answered = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route) and ":path}" not in r.path
                for m in r.methods if m != "HEAD" and not r.path.startswith("/docs/")}
    answered |= {(p, "get") for p in PROBE_PATHS} | {("/schema.json", "get")}
    documented = {(p, m) for p, ops in document["paths"].items() for m in ops}
    assert documented == answered
    app_paths = {r.path for r in app.routes if isinstance(r, Route)}
    assert DOC_PATHS - {"/schema.json"} <= app_paths


def test_every_route_has_its_bodies_errors_and_headers(document):
    components = document["components"]
    for route in ROUTES:
        op = document["paths"][route.path][route.method.lower()]
        assert route.request is not None or route.method == "GET", f"{route.path}: no request model"
        assert route.response is not None or route.stream is not None, f"{route.path}: no answer"
        if route.request is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert components["schemas"][ref.rsplit("/", 1)[1]]["properties"].keys() == \
                route.request.model_json_schema()["properties"].keys()
            assert op["responses"]["422"]["$ref"].endswith("validation_error")
        ok = op["responses"]["200"]
        assert {"X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= ok["headers"].keys()
        for status in ("401", "403", "404", "413", "429", "503"):
            assert status in op["responses"], (route.path, status)
    for kind in ErrorType:
        response = components["responses"][str(kind)]
        assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        if STATUS[kind] in (429, 503):
            assert "Retry-After" in response["headers"]
    assert "WWW-Authenticate" in components["responses"]["authentication_error"]["headers"]
    assert components["securitySchemes"]["bearer"] == {**components["securitySchemes"]["bearer"], "type": "http",
                                                       "scheme": "bearer"}


def test_the_error_body_matches_its_schema(document):
    import orjson

    schema = {**document["components"]["schemas"]["ErrorBody"], "$defs": document["components"]["schemas"]}
    schema = orjson.loads(orjson.dumps(schema).replace(b"#/components/schemas/", b"#/$defs/"))
    for kind in ErrorType:
        jsonschema.validate(orjson.loads(error_body(kind, "m", "p")), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": {"type": "nonsense", "message": "m", "param": None}}, schema)


def test_security_follows_the_settings():
    secured, open_ = openapi_document(secured=True), openapi_document(secured=False)
    assert secured["paths"]["/embed"]["post"]["security"] == [{"bearer": []}]
    assert {} in open_["paths"]["/embed"]["post"]["security"]
    assert secured["paths"]["/readyz"]["get"]["security"] == []


def test_bentoml_methods_come_from_the_route_table():
    schema = bentoml_schema()
    methods = {m["name"]: m for m in schema["routes"]}
    assert set(methods) == {r.client_method for r in ROUTES if r.client_method}
    assert {"embed", "classify", "generate"} <= set(methods)
    assert methods["embed"]["route"] == "/embed" and methods["embed"]["input"]["required"] == ["inputs"]
    assert methods["generate"]["output"] == {"type": "string", "is_stream": True, "media_type": "text/plain"}
    assert "stream" not in methods["embed"]["output"]


def test_the_document_names_the_served_models_per_task():
    document = openapi_document(secured=False, served={"minilm": "embeddings", "gpt2": "generation"})
    schemas = document["components"]["schemas"]
    assert schemas["EmbedRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["minilm"]
    assert schemas["GenerateTextRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["gpt2"]
    assert "none" in schemas["ClassifyRequest"]["properties"]["model"]["description"]
    # Built per call: one document's served models never leak into another's.
    unserved = openapi_document(secured=False)["components"]["schemas"]
    assert "enum" not in str(unserved["EmbedRequest"]["properties"]["model"])
    # /tokenize takes a model of any task.
    assert schemas["TokenizeRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["minilm", "gpt2"]


@pytest.mark.parametrize("field,value", [("temperature", True), ("top_p", "0.5"), ("seed", 1.5), ("stream", 1)])
def test_a_wrong_type_the_document_forbids_is_refused(field, value):
    """What the published schema calls invalid, validation refuses (pydantic's lax mode would coerce these)."""
    from pydantic import ValidationError

    from bentoformers.api.schemas import CompletionRequest, GenerateRequest

    for model in (GenerateRequest, CompletionRequest):
        with pytest.raises(ValidationError):
            model.model_validate({"prompt": "x", field: value})
        model.model_validate({"prompt": "x", "temperature": 1, "top_p": 0.5})  # integers are numbers


def test_dimensions_must_be_an_integer():
    from pydantic import ValidationError

    from bentoformers.api.schemas import OpenAIEmbeddingRequest

    with pytest.raises(ValidationError):
        OpenAIEmbeddingRequest.model_validate({"input": "x", "dimensions": "384"})

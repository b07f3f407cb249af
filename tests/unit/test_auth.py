"""AuthMiddleware around a small Starlette app: API keys, JWTs (HS256, RS256, ES256) and the attack matrix."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentoformers.api.routes import DOC_PATHS, PROBE_PATHS, ROUTE_TASKS
from bentoformers.middleware.auth import AuthMiddleware
from bentoformers.middleware.client_address import ClientAddress
from bentoformers.security import authenticator as authenticator_module
from bentoformers.security.authenticator import Authenticator, startup_authenticator
from bentoformers.security.keys import KeyStore, ReloadingKeyStore, create_key
from bentoformers.security.tokens import JwtVerifier
from bentoformers.settings import Settings

SECRET = "s" * 40
ISSUER, AUDIENCE = "https://issuer.example", "bentoformers"


def _whoami(request: Request) -> JSONResponse:
    identity = request.scope["state"]["identity"]
    return JSONResponse({"id": identity.id, "kind": identity.kind, "tier": identity.tier,
                         "scopes": sorted(identity.scopes)})


def _app(auth: Authenticator | None, client_address: ClientAddress | None = None) -> TestClient:
    paths = ["/embed", "/v1/embeddings", "/classify", "/generate", "/v1/completions", "/v1/models"]
    routes = [Route(p, _whoami, methods=["GET", "POST"]) for p in paths]
    routes += [Route(p, lambda r: JSONResponse({"ok": True})) for p in ["/livez", "/readyz", "/metrics"]]
    app = Starlette(routes=routes)
    guarded = AuthMiddleware(app, auth, client_address, open_paths=PROBE_PATHS | DOC_PATHS, route_tasks=ROUTE_TASKS)
    return TestClient(guarded, client=("203.0.113.9", 5000))


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_key):
    public = rsa_key.public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    alice, _ = create_key("alice", ["embeddings"], "gold", path)
    root, _ = create_key("root", ["*"], "default", path)
    return {"alice": alice, "root": root, "path": path}


@pytest.fixture(scope="module")
def client(keys, rsa_public_pem):
    verifier = JwtVerifier(secret=SECRET, public_key_pem=rsa_public_pem, issuer=ISSUER, audience=AUDIENCE)
    return _app(Authenticator(KeyStore.load(keys["path"]), verifier))


def _claims(**over):
    claims = {"sub": "svc-42", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300,
              "scope": "embeddings generation", "tier": "silver"}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict, claims: dict, sign_key: bytes | None) -> str:
    """A token built by hand, as an attacker would (PyJWT refuses to sign these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(sign_key, signing_input.encode(), hashlib.sha256).digest() if sign_key else b""
    return f"{signing_input}.{_b64(signature)}"


def _tokens(keys, rsa_key, rsa_public_pem):
    """name -> Authorization header value (None: no header) for the matrix below."""
    rs = lambda **kw: jwt.encode(_claims(**kw), rsa_key, algorithm="RS256")  # noqa: E731
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _, _, secret = keys["alice"][3:].partition("_")
    return {
        "no header": None,
        "wrong scheme": f"Basic {base64.b64encode(b'alice:' + keys['alice'].encode()).decode()}",
        "raw key without scheme": keys["alice"],
        "empty bearer": "Bearer ",
        "bad key": f"Bearer bf_alice_{'A' * 43}",
        "unknown key id": f"Bearer bf_mallory_{secret}",
        "garbage": "Bearer not-a-key",
        "expired JWT": f"Bearer {rs(exp=int(time.time()) - 3600)}",
        "JWT without exp": f"Bearer {rs(exp=None)}",
        "JWT wrong aud": f"Bearer {rs(aud='someone-else')}",
        "JWT wrong iss": f"Bearer {rs(iss='https://evil.example')}",
        "JWT signed by another key": f"Bearer {jwt.encode(_claims(), other_rsa, algorithm='RS256')}",
        "JWT alg none": f"Bearer {_forge({'alg': 'none', 'typ': 'JWT'}, _claims(), None)}",
        "JWT alg None": f"Bearer {_forge({'alg': 'None', 'typ': 'JWT'}, _claims(), None)}",
        "JWT HS/RS confusion": f"Bearer {_forge({'alg': 'HS256', 'typ': 'JWT'}, _claims(), rsa_public_pem)}",
        "JWT unlisted alg": f"Bearer {jwt.encode(_claims(), SECRET + 'x' * 30, algorithm='HS512')}",
        "JWT tampered payload": "Bearer " + ".".join([
            rs().split(".")[0], _b64(json.dumps(_claims(scope="*")).encode()), rs().split(".")[2]]),
    }


UNAUTHORIZED = [
    "no header", "wrong scheme", "raw key without scheme", "empty bearer", "bad key", "unknown key id", "garbage",
    "expired JWT", "JWT without exp", "JWT wrong aud", "JWT wrong iss", "JWT signed by another key", "JWT alg none",
    "JWT alg None", "JWT HS/RS confusion", "JWT unlisted alg", "JWT tampered payload",
]


@pytest.mark.parametrize("case", UNAUTHORIZED)
def test_invalid_credentials_get_401_with_a_bearer_challenge(client, keys, rsa_key, rsa_public_pem, case):
    header = _tokens(keys, rsa_key, rsa_public_pem)[case]
    r = client.post("/embed", headers={"Authorization": header} if header is not None else {})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    error = r.json()["error"]
    assert error["type"] == "authentication_error" and error["message"]
    assert "bf_" not in r.text  # the key is never echoed


@pytest.mark.parametrize("route,who,status", [
    ("/embed", "alice", 200),
    ("/v1/embeddings", "alice", 200),
    ("/classify", "alice", 403),
    ("/generate", "alice", 403),
    ("/v1/completions", "alice", 403),
    ("/v1/models", "alice", 200),
    ("/classify", "root", 200),
    ("/v1/completions", "root", 200),
    ("/generate", "jwt", 200),
    ("/classify", "jwt", 403),
])
def test_scopes_decide_which_routes_a_valid_identity_may_call(client, keys, rsa_key, route, who, status):
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256") if who == "jwt" else keys[who]
    r = client.post(route, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["type"] == "permission_error"
        assert "www-authenticate" not in r.headers


def test_identity_carries_id_scopes_and_tier_never_the_secret(client, keys, rsa_key):
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {keys['alice']}"})
    assert r.json() == {"id": "alice", "kind": "key", "tier": "gold", "scopes": ["embeddings"]}
    token = jwt.encode(_claims(scope=["generation"]), rsa_key, algorithm="RS256")
    r = client.get("/v1/models", headers={"Authorization": f"bearer {token}"})  # the scheme is case-insensitive
    assert r.json() == {"id": "svc-42", "kind": "jwt", "tier": "silver", "scopes": ["generation"]}


def test_hs256_and_es256_tokens(keys):
    hs = _app(Authenticator(None, JwtVerifier(secret=SECRET)))
    token = jwt.encode(_claims(aud=None, iss=None), SECRET, algorithm="HS256")
    assert hs.post("/embed", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    es = _app(Authenticator(None, JwtVerifier(public_key_pem=pem)))
    token = jwt.encode(_claims(aud=None, iss=None), ec_key, algorithm="ES256")
    assert es.post("/embed", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    forged = _forge({"alg": "HS256"}, _claims(aud=None, iss=None), pem)
    assert es.post("/embed", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_configuration_mistakes_are_refused():
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtVerifier(secret="short")
    with pytest.raises(ValueError, match="do not fit"):
        JwtVerifier(secret=SECRET, algorithms=["RS256"])


def test_probes_metrics_and_cors_preflight_pass_without_credentials(client):
    for path in ["/livez", "/readyz", "/metrics"]:
        assert client.get(path).status_code == 200, path
    preflight_headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    preflight = client.options("/embed", headers=preflight_headers)
    assert preflight.status_code != 401
    assert client.options("/embed").status_code == 401  # a bare OPTIONS is no preflight


def test_key_store_holds_only_hashes(keys):
    text = keys["path"].read_text()
    assert keys["alice"] not in text and keys["alice"].rsplit("_", 1)[-1] not in text
    assert "sha256:" in text and oct(keys["path"].stat().st_mode & 0o777) == "0o600"


def test_open_server_identifies_callers_by_address_and_trusts_only_configured_proxies():
    open_app = _app(None, ClientAddress(["203.0.113.0/24"]))
    r = open_app.post("/embed", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.20"})
    assert r.json()["id"] == "198.51.100.7" and r.json()["kind"] == "anonymous"
    untrusting = _app(None, ClientAddress(["10.0.0.0/8"]))
    r = untrusting.post("/embed", headers={"X-Forwarded-For": "198.51.100.7"})
    assert r.json()["id"] == "203.0.113.9"  # the peer is no trusted proxy: its header is ignored


def test_secure_by_default_refuses_a_container_without_credentials(monkeypatch, caplog, keys):
    for name in ["BENTOFORMERS_AUTH", "BENTOFORMERS_API_KEYS_FILE", "BENTOFORMERS_API_KEYS", "BENTOFORMERS_JWT_SECRET",
                 "BENTOFORMERS_JWT_PUBLIC_KEY_FILE"]:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="BENTOFORMERS_AUTH=disabled"):
        startup_authenticator(Settings(), containerized=True)
    with pytest.raises(RuntimeError):
        startup_authenticator(Settings(auth="required"), containerized=False)
    with caplog.at_level(logging.WARNING, logger="bentoformers.auth"):
        assert startup_authenticator(Settings(), containerized=False) is None
        assert "WITHOUT AUTHENTICATION" in caplog.text
        assert startup_authenticator(Settings(auth="disabled"), containerized=True) is None
    auth = startup_authenticator(Settings(api_keys_file=str(keys["path"])), containerized=True)
    assert auth is not None and auth.identify(keys["alice"]).id == "alice"
    inline = Settings(api_keys=keys["path"].read_text())
    assert startup_authenticator(inline, containerized=True).identify(keys["root"]).id == "root"


def test_a_key_removed_from_the_file_stops_working_without_a_restart(tmp_path):
    path = tmp_path / "keys.yaml"
    keep, _ = create_key("keep", ["*"], "default", path)
    revoke, _ = create_key("revoke", ["*"], "default", path)
    store = ReloadingKeyStore(path, every=0)
    assert store.verify(revoke).id == "revoke"
    rows = [r for r in yaml.safe_load(path.read_text()) if r["id"] != "revoke"]
    path.write_text(yaml.safe_dump(rows))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed mtime, even on a coarse clock
    assert store.verify(revoke) is None and store.verify(keep).id == "keep"


def _touch(path, seconds_ahead):
    os.utime(path, ns=(time.time_ns(), time.time_ns() + seconds_ahead * 10**9))  # a changed mtime, coarse clock too


def test_workers_agree_on_the_key_set_even_when_the_file_breaks_after_a_revocation(tmp_path):
    path = tmp_path / "keys.yaml"
    keep, _ = create_key("keep", ["*"], "default", path)
    revoke, _ = create_key("revoke", ["*"], "default", path)
    inline_key, inline_record = create_key("inline", ["*"], "default", None)
    inline = yaml.safe_dump([inline_record.model_dump(mode="json")])
    one, two = ReloadingKeyStore(path, inline, every=0), ReloadingKeyStore(path, inline, every=3600)
    path.write_text(yaml.safe_dump([r for r in yaml.safe_load(path.read_text()) if r["id"] != "revoke"]))
    _touch(path, 1)
    assert one.verify(revoke) is None  # worker one re-read the file; worker two has not looked yet
    path.write_text("{not: [valid")  # then a bad edit
    _touch(path, 2)
    two._next_check = 0  # worker two's turn to look
    for worker in (one, two):
        assert worker.verify(revoke) is None, "a worker that missed the revocation brought the revoked key back"
        assert worker.verify(keep) is None  # a broken file accepts none of its keys: the one set all agree on
        assert worker.verify(inline_key).id == "inline"  # keys given inline do not depend on the file
    path.write_text(yaml.safe_dump([create_key("keep", ["*"], "default", None)[1].model_dump(mode="json")]))
    # Fixed, even within the same mtime tick: a broken file is read again at every check.
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert one.verify(keep) is None and len(one) == 2  # the new "keep" record has a new secret


@pytest.mark.parametrize("with_jwt", [False, True], ids=["keys only", "keys and JWT"])
def test_an_empty_key_file_keeps_authentication_on_and_a_key_added_later_works(
    monkeypatch, caplog, tmp_path, with_jwt
):
    monkeypatch.setattr(authenticator_module, "KEY_FILE_RELOAD_SECONDS", 0)  # re-read the file on every check
    path = tmp_path / "keys.yaml"
    path.write_text("")
    settings = Settings(api_keys_file=str(path), jwt_secret=SECRET if with_jwt else None)
    with caplog.at_level(logging.WARNING, logger="bentoformers.auth"):
        auth = startup_authenticator(settings, containerized=False)
    assert auth is not None, "an empty key file turned authentication off"
    client = _app(auth)
    _, _, secret = create_key("probe", ["*"], "default", None)[0][3:].partition("_")
    assert client.post("/embed").status_code == 401
    assert client.post("/embed", headers={"Authorization": f"Bearer bf_mallory_{secret}"}).status_code == 401

    late, _ = create_key("late", ["embeddings"], "default", path)  # appended while the server runs
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed mtime, even on a coarse clock
    r = client.post("/embed", headers={"Authorization": f"Bearer {late}"})
    assert r.status_code == 200 and r.json()["id"] == "late"
    assert client.post("/embed", headers={"Authorization": f"Bearer bf_mallory_{secret}"}).status_code == 401
    assert "WITHOUT AUTHENTICATION" not in caplog.text and "no API key configured yet" in caplog.text

"""Who is calling: API keys (stored as hashes) and JWT bearer tokens, checked by a pure ASGI middleware.

Keys look like `bf_<id>_<secret>`, the secret 256 random bits. The store holds only `sha256:<hex>` of the
whole key. A plain SHA-256 is enough (no slow KDF): slow hashes protect low-entropy passwords from offline
guessing, and a 256-bit random secret cannot be guessed however fast the hash is. The id in the key finds
its record, then the hashes are compared in constant time.

The middleware sets `scope["state"]["identity"]` (an `Identity`) for everything inside it, answers 401
(`WWW-Authenticate: Bearer`) for missing or invalid credentials and 403 for a route outside the
identity's scopes, and never raises: BentoML hangs a request whose middleware raises.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from bentoformers.api.routes import PROBE_PATHS, ROUTE_TASKS
from bentoformers.errors import ApiError, ErrorType, error_response
from bentoformers.observability import metrics
from bentoformers.settings import Settings

logger = logging.getLogger("bentoformers.security.auth")

TASKS = ("embeddings", "classification", "generation")
ALL = "*"
KEY_PREFIX = "bf"
KEY_ID = r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}"
_KEY_RE = re.compile(rf"{KEY_PREFIX}_({KEY_ID})_([A-Za-z0-9_-]{{20,}})")
DEFAULT_TIER = "default"
KEY_FILE_RELOAD_SECONDS = 5.0  # how soon a change to the key file takes effect
ANONYMOUS_TIER = "anonymous"


@dataclass(frozen=True)
class Identity:
    id: str  # key id, JWT subject, or the client address when anonymous; never a secret
    scopes: frozenset[str]
    tier: str
    kind: str  # "key" | "jwt" | "anonymous"

    def may(self, task: str) -> bool:
        return ALL in self.scopes or task in self.scopes


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=rf"^{KEY_ID}$")
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    scopes: tuple[str, ...] = Field(min_length=1)
    tier: str = DEFAULT_TIER

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(scopes) - {*TASKS, ALL}
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}; use {', '.join(TASKS)} or {ALL}")
        return scopes


_RECORDS = TypeAdapter(list[KeyRecord])


class ReloadingKeyStore:
    """The key file, re-read within `every` seconds of a change (a revoked key stops working without a
    restart; a Kubernetes Secret volume updates in place), plus records given inline. A file that no longer
    parses keeps the keys already loaded, and says so in the log."""

    def __init__(self, path: str | Path, inline: str | None = None, every: float = 5.0) -> None:
        self.path, self.inline, self.every = Path(path), inline, every
        self._next_check, self._mtime = time.monotonic() + every, self._stat()
        self.store = self._load()

    def _stat(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def _load(self) -> KeyStore:
        records = list(KeyStore.load(self.path).records.values())
        if self.inline:
            records += KeyStore.parse(self.inline).records.values()
        return KeyStore(records)

    def __len__(self) -> int:
        return len(self.store)

    def verify(self, key: str) -> Identity | None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.every
            mtime = self._stat()
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    self.store = self._load()
                    logger.info("API keys reloaded from %s: %d key(s)", self.path, len(self.store))
                except Exception as exc:
                    logger.error("API key file %s unreadable (%s); keeping the %d key(s) loaded before",
                                 self.path, type(exc).__name__, len(self.store))
        return self.store.verify(key)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, records: Iterable[KeyRecord]) -> None:
        self.records: dict[str, KeyRecord] = {}
        for record in records:
            if record.id in self.records:
                raise ValueError(f"duplicate API key id {record.id!r}")
            self.records[record.id] = record

    @classmethod
    def parse(cls, text: str) -> KeyStore:
        return cls(_RECORDS.validate_python(yaml.safe_load(text) or []))

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        return cls.parse(Path(path).read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return len(self.records)

    def verify(self, key: str) -> Identity | None:
        match = _KEY_RE.fullmatch(key)
        record = self.records.get(match.group(1)) if match else None
        # Compare against a dummy when the id is unknown, so timing does not tell which ids exist.
        expected = record.hash if record else "sha256:" + "0" * 64
        if not hmac.compare_digest(hash_key(key).encode(), expected.encode()) or record is None:
            return None
        return Identity(record.id, frozenset(record.scopes), record.tier, "key")


def new_key(key_id: str) -> str:
    if not re.fullmatch(KEY_ID, key_id):
        raise ValueError(f"key id {key_id!r} must match {KEY_ID}")
    return f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def create_key(key_id: str, scopes: list[str], tier: str, path: Path | None) -> tuple[str, KeyRecord]:
    """Makes a key; with a path, appends its record (hash only) to that key file, written atomically, mode 0600."""
    key = new_key(key_id)
    record = KeyRecord(id=key_id, hash=hash_key(key), scopes=tuple(scopes), tier=tier)
    if path is not None:
        store = KeyStore.load(path) if path.exists() else KeyStore([])
        if key_id in store.records:
            raise ValueError(f"{path} already holds a key with id {key_id!r}")
        rows = [r.model_dump(mode="json") for r in [*store.records.values(), record]]
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(rows, f, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return key, record


class ExpiredCredentials(Exception):
    pass


class JwtVerifier:
    """Pinned algorithms: the HMAC secret verifies only HS*, the public key only its own family (no alg confusion)."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key_pem: bytes | None = None,
        algorithms: Iterable[str] = (),
        issuer: str | None = None,
        audience: str | None = None,
        scope_claim: str = "scope",
        tier_claim: str = "tier",
        leeway: int = 30,
    ) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        self.keys: dict[str, Any] = {}
        wanted = set(algorithms)
        if secret is not None:
            if len(secret.encode()) < 32:
                raise ValueError("the JWT secret must be at least 32 bytes")
            for alg in (wanted & {"HS256", "HS384", "HS512"}) if wanted else {"HS256"}:
                self.keys[alg] = secret
        if public_key_pem is not None:
            public_key = load_pem_public_key(public_key_pem)
            if isinstance(public_key, rsa.RSAPublicKey):
                family = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
                default = {"RS256"}
            elif isinstance(public_key, ec.EllipticCurvePublicKey):
                family, default = {"ES256", "ES384", "ES512"}, {"ES256"}
            else:
                raise ValueError("the JWT public key must be RSA or EC")
            for alg in (wanted & family) if wanted else default:
                self.keys[alg] = public_key
        refused = wanted - set(self.keys)
        if refused:
            raise ValueError(f"JWT algorithms {sorted(refused)} do not fit the configured secret/key")
        if not self.keys:
            raise ValueError("JWT needs a secret or a public key")
        self.issuer, self.audience, self.leeway = issuer, audience, leeway
        self.required_claims = ["exp", "sub", *(["iss"] if issuer else []), *(["aud"] if audience else [])]
        self.scope_claim, self.tier_claim = scope_claim, tier_claim

    def verify(self, token: str) -> Identity | None:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            key = self.keys.get(alg) if isinstance(alg, str) else None
            if key is None:  # includes "none" and any algorithm not configured
                return None
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": self.required_claims},
            )
        except jwt.ExpiredSignatureError:
            raise ExpiredCredentials from None
        except jwt.PyJWTError:
            return None
        raw = claims.get(self.scope_claim, "")
        if isinstance(raw, str):
            scopes = raw.split()
        else:
            scopes = [s for s in raw if isinstance(s, str)] if isinstance(raw, list) else []
        tier = claims.get(self.tier_claim)
        return Identity(str(claims["sub"]), frozenset(scopes), tier if isinstance(tier, str) else DEFAULT_TIER, "jwt")


class Authenticator:
    """Every configured credential source; `None` sources are simply absent."""

    def __init__(
        self, keys: KeyStore | ReloadingKeyStore | None = None, jwt_verifier: JwtVerifier | None = None
    ) -> None:
        self.keys, self.jwt = keys, jwt_verifier

    @property
    def configured(self) -> bool:
        # A key store counts as configured even while it holds no key: an empty key file must not turn
        # authentication off, and keys added to it later are loaded by its reload.
        return self.keys is not None or self.jwt is not None

    def identify(self, token: str) -> Identity | None:
        if self.keys is not None and token.startswith(f"{KEY_PREFIX}_"):
            return self.keys.verify(token)
        if self.jwt is not None and token.count(".") == 2:
            return self.jwt.verify(token)
        return None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        keys: KeyStore | ReloadingKeyStore | None = None
        if settings.api_keys_file:
            keys = ReloadingKeyStore(settings.api_keys_file, settings.api_keys, every=KEY_FILE_RELOAD_SECONDS)
        elif settings.api_keys:
            keys = KeyStore.parse(settings.api_keys)
        verifier = None
        if settings.jwt_secret is not None or settings.jwt_public_key_file:
            key_file = settings.jwt_public_key_file
            verifier = JwtVerifier(
                secret=settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
                public_key_pem=Path(key_file).read_bytes() if key_file else None,
                algorithms=settings.jwt_algorithms,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                scope_claim=settings.jwt_scope_claim,
                tier_claim=settings.jwt_tier_claim,
                leeway=settings.jwt_leeway_seconds,
            )
        return cls(keys, verifier)


def startup_authenticator(settings: Settings, containerized: bool) -> Authenticator | None:
    """The authenticator to enforce, or None to run open. Refuses (raises) where running open is not allowed."""
    if settings.auth == "disabled":
        logger.warning(
            "AUTHENTICATION IS DISABLED (BENTOFORMERS_AUTH=disabled): anyone who reaches this server can use it"
        )
        return None
    auth = Authenticator.from_settings(settings)
    if auth.configured:
        n_keys = len(auth.keys) if auth.keys is not None else 0
        logger.info("authentication on: %d API key(s)%s", n_keys, ", JWT" if auth.jwt is not None else "")
        if auth.keys is not None and n_keys == 0:
            logger.warning("no API key configured yet (an empty key file or list): every API key is refused "
                           "until one is added")
        return auth
    if containerized or settings.auth == "required":
        raise RuntimeError(
            "no credentials configured: set BENTOFORMERS_API_KEYS_FILE (see `bentoformers keys create`), "
            "BENTOFORMERS_JWT_SECRET or BENTOFORMERS_JWT_PUBLIC_KEY_FILE, or run open on purpose with "
            "BENTOFORMERS_AUTH=disabled"
        )
    logger.warning(
        "NO CREDENTIALS CONFIGURED: serving WITHOUT AUTHENTICATION. Fine on a laptop; a container refuses to "
        "start like this. Create a key with `bentoformers keys create` and set BENTOFORMERS_API_KEYS_FILE."
    )
    return None


class AuthMiddleware:
    """Sets scope["state"]["identity"]; 401/403 in the one error body. With no authenticator, everyone is
    anonymous (identified by client address, for rate limits) with every scope."""

    def __init__(
        self, app: ASGIApp, authenticator: Authenticator | None, client_address: ClientAddress | None = None
    ) -> None:
        self.app, self.auth = app, authenticator
        self.client_address = client_address or ClientAddress()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Probes, the metrics scrape and CORS preflight need no credentials.
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS or _is_preflight(scope):
            await self.app(scope, receive, send)
            return
        try:
            identity = self._identify(scope)
        except Exception as exc:
            await answer_failed_check(exc, "authentication", scope, receive, send)
            return
        scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)

    def _identify(self, scope: Scope) -> Identity:
        if self.auth is None:
            return Identity(self.client_address(scope), frozenset({ALL}), ANONYMOUS_TIER, "anonymous")
        header = _header(scope, b"authorization")
        scheme, _, token = header.partition(" ")
        if not header:
            raise _unauthorized("missing credentials: send `Authorization: Bearer <API key or JWT>`",
                                reason="missing_credentials")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("unsupported authorization scheme: send `Authorization: Bearer <API key or JWT>`")
        try:
            identity = self.auth.identify(token.strip())
        except ExpiredCredentials:
            raise _unauthorized("the token has expired", error="invalid_token", reason="expired_credentials") from None
        if identity is None:
            raise _unauthorized("invalid credentials", error="invalid_token")
        task = ROUTE_TASKS.get(scope["path"].rstrip("/") or "/")
        if task is not None and not identity.may(task):
            raise Refused("forbidden", ApiError(
                ErrorType.PERMISSION,
                f"this credential may not call {task} (its scopes: {', '.join(sorted(identity.scopes)) or 'none'})",
            ))
        return identity


class ClientAddress:
    """The caller's address: the peer, or, when the peer is a trusted proxy, the rightmost X-Forwarded-For
    entry that is not itself a trusted proxy (entries further left are whatever the client wrote)."""

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def __call__(self, scope: Scope) -> str:
        peer = (scope.get("client") or ("unknown", 0))[0]
        if not self.trusted or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in _header(scope, b"x-forwarded-for").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer


class Refused(Exception):
    """A refusal: the answer, and its reason for the rejection metric."""

    def __init__(self, reason: str, error: ApiError) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


async def answer_failed_check(exc: Exception, check: str, scope: Scope, receive: Receive, send: Send) -> None:
    """The answer when a middleware's check raised: a Refused gets its own error (counted by reason), anything
    else is logged and answered 500. Never an exception into BentoML: it would hang the request."""
    if isinstance(exc, Refused):
        metrics.count_rejection(exc.reason)
        error = exc.error
    else:
        logger.error("%s failed unexpectedly", check, exc_info=exc)
        error = ApiError(ErrorType.SERVER, "internal error; see the server log")
    await error_response(error)(scope, receive, send)


def _unauthorized(message: str, error: str | None = None, reason: str = "invalid_credentials") -> Refused:
    challenge = f'Bearer realm="bentoformers", error="{error}"' if error else 'Bearer realm="bentoformers"'
    return Refused(reason, ApiError(ErrorType.AUTHENTICATION, message, headers={"WWW-Authenticate": challenge}))


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _is_preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and bool(_header(scope, b"access-control-request-method"))

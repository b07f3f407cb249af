"""JWT bearer tokens (PyJWT), with algorithms pinned to the configured key type."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jwt

from bentoformers.security.identity import DEFAULT_TIER, Identity


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

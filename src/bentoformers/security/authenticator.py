"""Every configured credential source, and the start-up rule: secure by default in a container."""

from __future__ import annotations

import logging
from pathlib import Path

from bentoformers.security.identity import Identity
from bentoformers.security.keys import (
    KEY_FILE_RELOAD_SECONDS,
    KEY_PREFIX,
    KeyStore,
    ReloadingKeyStore,
)
from bentoformers.security.tokens import JwtVerifier
from bentoformers.settings import Settings

logger = logging.getLogger("bentoformers.auth")


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


def startup_authenticator(settings: Settings, containerized: bool, announce: bool = True) -> Authenticator | None:
    """The authenticator to enforce, or None to run open. Refuses (raises) where running open is not allowed.
    `announce`: log the mode (once per start: BentoML's worker processes each build the service again)."""
    if settings.auth == "disabled":
        if announce:
            logger.warning(
                "AUTHENTICATION IS DISABLED (BENTOFORMERS_AUTH=disabled): anyone who reaches this server can use it"
            )
        return None
    auth = Authenticator.from_settings(settings)
    if auth.configured:
        n_keys = len(auth.keys) if auth.keys is not None else 0
        if announce:
            logger.info("authentication on: %d API key(s)%s", n_keys, ", JWT" if auth.jwt is not None else "")
        if auth.keys is not None and n_keys == 0:
            if announce:
                logger.warning("no API key configured yet (an empty key file or list): every API key is "
                               "refused until one is added")
        return auth
    if containerized or settings.auth == "required":
        raise RuntimeError(
            "no credentials configured: set BENTOFORMERS_API_KEYS_FILE (see `bentoformers keys create`), "
            "BENTOFORMERS_JWT_SECRET or BENTOFORMERS_JWT_PUBLIC_KEY_FILE, or run open on purpose with "
            "BENTOFORMERS_AUTH=disabled"
        )
    if announce:
        logger.warning(
            "NO CREDENTIALS CONFIGURED: serving WITHOUT AUTHENTICATION. Fine on a laptop; a container refuses to "
            "start like this. Create a key with `bentoformers keys create` and set BENTOFORMERS_API_KEYS_FILE."
        )
    return None

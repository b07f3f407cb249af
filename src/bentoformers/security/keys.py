"""API keys: `bf_<id>_<secret>`, the secret 256 random bits, stored only as a hash.

The store holds only `sha256:<hex>` of the whole key. A plain SHA-256 is enough (no slow KDF): slow hashes
protect low-entropy passwords from offline guessing, and a 256-bit random secret cannot be guessed however
fast the hash is. The id in the key finds its record, then the hashes are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from bentoformers.security.identity import ALL, DEFAULT_TIER, TASKS, Identity

logger = logging.getLogger("bentoformers.auth")

KEY_PREFIX = "bf"
KEY_ID = r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}"
_KEY_RE = re.compile(rf"{KEY_PREFIX}_({KEY_ID})_([A-Za-z0-9_-]{{20,}})")
KEY_FILE_RELOAD_SECONDS = 5.0  # how soon a change to the key file takes effect


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
    restart; a Kubernetes Secret volume updates in place), plus records given inline.

    A file that no longer parses (or cannot be read) accepts none of its keys until it does, re-read at every
    check, and says so in the log. Keeping the keys loaded before would let each worker keep whichever
    version it had read last: one that missed a revocation would accept the revoked key, another not.
    The file is the one key set every worker and replica can agree on."""

    def __init__(self, path: str | Path, inline: str | None = None, every: float = 5.0) -> None:
        self.path, self.inline, self.every = Path(path), inline, every
        self._next_check, self._mtime = time.monotonic() + every, self._stat()
        self.store = self._load()

    def _stat(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def _load(self, with_file: bool = True) -> KeyStore:
        records = list(KeyStore.load(self.path).records.values()) if with_file else []
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
                try:
                    self.store = self._load()
                    self._mtime = mtime
                    logger.info("API keys reloaded from %s: %d key(s)", self.path, len(self.store))
                except (OSError, ValueError, yaml.YAMLError) as exc:  # pydantic's ValidationError is a ValueError
                    self.store = self._load(with_file=False)
                    self._mtime = None  # read it again at the next check
                    logger.error("API key file %s unreadable (%s); refusing its keys until it parses (%d inline "
                                 "key(s) still accepted)", self.path, type(exc).__name__, len(self.store))
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

"""API keys and tenants.

A key looks like ``llmops_<id>_<secret>``: ``id`` (12 hex characters) is visible and names the
key in listings and logs; ``secret`` carries 256 random bits. Only the SHA-256 of the whole key
is stored, and lookups compare hashes in constant time. A plain hash (not a password hash) is
enough: the secret is random and long, so there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

KEY_PREFIX = "llmops"
ID_BYTES = 6
SECRET_BYTES = 32
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
T = TypeVar("T")


class KeyRejectedError(Exception):
    """An API key that does not authenticate; the message says why, without the key.

    Args:
        message: What the caller is told.
        reason: ``invalid``, ``revoked``, ``expired`` or ``no_tenant`` (for the audit log).
        key_id: The key's public id, when the key names a stored one.
        tenant: The tenant of that key.
    """

    def __init__(
        self,
        message: str,
        reason: str = "invalid",
        key_id: str | None = None,
        tenant: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id
        self.tenant = tenant


class Tenant(BaseModel):
    """Who is calling, what they may call, and how much."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Tenant name, shown in metrics.")
    allowed_models: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Model names this tenant may use; '*' allows every model.",
    )
    requests_per_minute: int = Field(default=600, ge=1, description="Request rate limit.")
    tokens_per_minute: int = Field(
        default=200_000, ge=1, description="Prompt + completion tokens per minute."
    )
    max_concurrent_streams: int = Field(default=32, ge=1, description="Open streams at once.")
    tokens_per_day: int = Field(default=5_000_000, ge=1, description="Daily token budget.")

    def may_use(self, model: str) -> bool:
        """True when the tenant may call ``model``."""
        return "*" in self.allowed_models or model in self.allowed_models


class KeyRecord(BaseModel):
    """A stored key: its public id, the hash of the whole key, and its tenant."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Public key id: the visible part of the key.")
    sha256: str = Field(description="Hex SHA-256 of the whole key.")
    tenant: str = Field(description="Name of the tenant the key belongs to.")
    description: str = Field(default="", description="Free text for operators.")
    created_at: float = Field(description="Unix time of creation.")
    revoked_at: float | None = Field(default=None, description="Unix time of revocation.")
    expires_at: float | None = Field(
        default=None, description="Unix time after which the key is refused; None: never."
    )

    @property
    def active(self) -> bool:
        """False once revoked."""
        return self.revoked_at is None

    def expired(self, now: float | None = None) -> bool:
        """True from ``expires_at`` on."""
        return (
            self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at
        )


class KeyFile(BaseModel):
    """The on-disk (or in-Secret) document: tenants and key records."""

    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, Tenant] = Field(default_factory=dict)
    keys: list[KeyRecord] = Field(default_factory=list)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """Makes a new random key.

    Returns:
        ``(key_id, key)``; the key is shown once and never stored.
    """
    key_id = secrets.token_hex(ID_BYTES)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def key_id_of(key: str) -> str | None:
    """The public id inside a well-formed key, or None for anything else."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 2 * ID_BYTES:
        return None
    return parts[1]


class KeyStore(Protocol):
    """Where keys and tenants live; the gateway only reads, `llmops keys` writes."""

    def load(self) -> KeyFile:
        """Reads the current document."""
        ...

    def version(self) -> object:
        """Changes whenever the document changes (cheap to ask on every request)."""
        ...


class EditableKeyStore:
    """Creating and revoking keys, for stores that can apply a change to the whole document.

    Subclasses implement `update`: read the document, apply the change, write it back, without
    losing a concurrent change (a lock, or a retry on conflict).
    """

    def load(self) -> KeyFile:
        """Reads the current document."""
        raise NotImplementedError

    def update(self, change: Callable[[KeyFile], T]) -> T:
        """Applies ``change`` to the stored document and writes it back."""
        raise NotImplementedError

    def create(
        self, tenant: Tenant, description: str = "", expires_at: float | None = None
    ) -> tuple[KeyRecord, str]:
        """Creates a key for ``tenant`` (adding or updating the tenant).

        Args:
            tenant: The key's tenant.
            description: Free text for operators.
            expires_at: Unix time from which the key is refused; None: never.

        Returns:
            The stored record and the key itself, which is not kept anywhere.
        """
        key_id, key = new_key()
        record = KeyRecord(
            id=key_id,
            sha256=hash_key(key),
            tenant=tenant.name,
            description=description,
            created_at=time.time(),
            expires_at=expires_at,
        )

        def add(document: KeyFile) -> None:
            document.tenants[tenant.name] = tenant
            document.keys.append(record)

        self.update(add)
        return record, key

    def revoke(self, key_id: str) -> KeyRecord:
        """Revokes a key by its public id.

        Raises:
            KeyError: no such key.
        """

        def mark(document: KeyFile) -> KeyRecord:
            for i, record in enumerate(document.keys):
                if record.id == key_id:
                    if record.active:
                        record = record.model_copy(update={"revoked_at": time.time()})
                        document.keys[i] = record
                    return record
            raise KeyError(key_id)

        return self.update(mark)


def dump_document(document: KeyFile) -> str:
    """The key file's text."""
    return json.dumps(document.model_dump(mode="json"), indent=2) + "\n"


class FileKeyStore(EditableKeyStore):
    """A JSON file of tenants and hashed keys, for `llmops up` and single machines.

    Writes are atomic (temporary file + rename) under a file lock, so concurrent
    `llmops keys` commands never lose an update.

    Args:
        path: The JSON file; created on first write.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def version(self) -> object:
        """The file's modification time and size; None while it does not exist."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def load(self) -> KeyFile:
        """Reads the file; a missing file is an empty store."""
        if not self.path.exists():
            return KeyFile()
        return KeyFile.model_validate_json(self.path.read_text())

    def update(self, change: Callable[[KeyFile], T]) -> T:
        """Applies ``change`` under the file lock and writes the file back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            document = self.load()
            result = change(document)
            handle, staging = tempfile.mkstemp(dir=self.path.parent, prefix=".keys.")
            with os.fdopen(handle, "w") as out:
                out.write(dump_document(document))
            os.chmod(staging, 0o600)
            os.replace(staging, self.path)
        return result


class KeyIndex:
    """Looks keys up by hash, in constant time per candidate.

    Args:
        document: Tenants and key records, as a store loaded them.
    """

    def __init__(self, document: KeyFile) -> None:
        self.tenants = dict(document.tenants)
        self._by_id: dict[str, KeyRecord] = {record.id: record for record in document.keys}

    def authenticate(self, key: str) -> tuple[KeyRecord, Tenant]:
        """The record and tenant of an active key.

        Raises:
            KeyRejectedError: the key is malformed, unknown, revoked, expired, or its tenant is
                gone.
        """
        key_id = key_id_of(key)
        record = self._by_id.get(key_id) if key_id else None
        if record is None or not hmac.compare_digest(record.sha256, hash_key(key)):
            # The id of a key that fails its hash is the caller's claim, not a fact: not logged.
            raise KeyRejectedError("invalid API key")
        if not record.active:
            raise KeyRejectedError(
                f"API key {record.id} has been revoked", "revoked", record.id, record.tenant
            )
        if record.expired():
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires_at))
            raise KeyRejectedError(
                f"API key {record.id} expired at {when}", "expired", record.id, record.tenant
            )
        tenant = self.tenants.get(record.tenant)
        if tenant is None:
            raise KeyRejectedError(
                f"API key {record.id} belongs to no configured tenant",
                "no_tenant",
                record.id,
                record.tenant,
            )
        return record, tenant

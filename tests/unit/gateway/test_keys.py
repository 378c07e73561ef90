"""API keys: format, hashing at rest, authentication, revocation, concurrent edits."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmops_gateway.keys import (
    FileKeyStore,
    KeyIndex,
    KeyRejectedError,
    Tenant,
    hash_key,
    key_id_of,
    new_key,
)


def test_keys_carry_256_random_bits_and_a_visible_id() -> None:
    key_id, key = new_key()
    assert key.startswith(f"llmops_{key_id}_")
    assert key_id_of(key) == key_id
    secret = key.split("_", 2)[2]
    assert len(secret) >= 43  # 32 bytes, base64url
    assert len({new_key()[1] for _ in range(200)}) == 200


@pytest.mark.parametrize("bad", ["", "sk-123", "llmops_short_x", "other_c96604b453ae_x"])
def test_malformed_keys_have_no_id(bad: str) -> None:
    assert key_id_of(bad) is None


def test_store_keeps_only_the_hash(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    record, key = store.create(Tenant(name="acme"))
    text = store.path.read_text()
    assert key not in text
    assert key.split("_", 2)[2] not in text
    assert record.sha256 == hash_key(key)
    assert json.loads(text)["keys"][0]["sha256"] == hash_key(key)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_authenticate_finds_the_tenant(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="acme", allowed_models=["m1"], requests_per_minute=7))
    record, tenant = KeyIndex(store.load()).authenticate(key)
    assert tenant.name == "acme"
    assert tenant.requests_per_minute == 7
    assert tenant.may_use("m1")
    assert not tenant.may_use("m2")
    assert record.tenant == "acme"


def test_wrong_secret_with_a_real_id_is_rejected(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="acme"))
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with pytest.raises(KeyRejectedError, match="invalid API key"):
        KeyIndex(store.load()).authenticate(forged)


def test_revoked_keys_are_rejected_with_their_id(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    record, key = store.create(Tenant(name="acme"))
    store.revoke(record.id)
    with pytest.raises(KeyRejectedError, match=f"{record.id} has been revoked") as caught:
        KeyIndex(store.load()).authenticate(key)
    assert key not in str(caught.value)
    with pytest.raises(KeyError):
        store.revoke("000000000000")


def test_expired_keys_are_rejected_saying_so(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    now = time.time()
    expired, old_key = store.create(Tenant(name="acme"), expires_at=now - 1)
    _, fresh_key = store.create(Tenant(name="acme"), expires_at=now + 3600)
    index = KeyIndex(store.load())
    with pytest.raises(KeyRejectedError, match=f"{expired.id} expired at ") as caught:
        index.authenticate(old_key)
    assert (caught.value.reason, caught.value.key_id, caught.value.tenant) == (
        "expired",
        expired.id,
        "acme",
    )
    assert index.authenticate(fresh_key)[1].name == "acme"


def test_concurrent_creates_lose_nothing(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda i: store.create(Tenant(name=f"t{i % 3}"))[1], range(24)))
    index = KeyIndex(store.load())
    assert len(store.load().keys) == 24
    assert all(index.authenticate(key) for key in keys)


def test_tenant_limits_are_validated() -> None:
    with pytest.raises(ValidationError, match="requests_per_minute"):
        Tenant(name="acme", requests_per_minute=0)
    with pytest.raises(ValidationError, match="name"):
        Tenant(name="Not A Name")


def test_keys_command_prints_the_key_once(tmp_path: Path) -> None:
    store = tmp_path / "keys.json"
    llmops = [sys.executable, "-m", "llmops_cli", "keys"]
    created = subprocess.run(
        [*llmops, "create", "--tenant", "acme", "--model", "m1", "--store", str(store)],
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    assert key_id_of(key) is not None
    assert "only time" in created.stderr
    listed = subprocess.run(
        [*llmops, "list", "--store", str(store)], capture_output=True, text=True, check=True
    )
    assert key_id_of(key) in listed.stdout
    assert key not in listed.stdout
    revoked = subprocess.run(
        [*llmops, "revoke", str(key_id_of(key)), "--store", str(store)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "revoked" in revoked.stdout
    missing = subprocess.run(
        [*llmops, "revoke", "nope", "--store", str(store)], capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert "llmops keys list" in missing.stderr


@pytest.mark.parametrize(
    ("option", "value", "low", "high"),
    [
        ("--expires-in", "30d", 30 * 86400 - 60, 30 * 86400 + 60),
        ("--expires-in", "12h", 12 * 3600 - 60, 12 * 3600 + 60),
        ("--expires-at", "2999-01-31", 10**10, 10**11),
    ],
)
def test_keys_command_sets_an_expiry(
    tmp_path: Path, option: str, value: str, low: float, high: float
) -> None:
    store = tmp_path / "keys.json"
    llmops = [sys.executable, "-m", "llmops_cli", "keys"]
    subprocess.run(
        [*llmops, "create", "--tenant", "acme", option, value, "--store", str(store)],
        capture_output=True,
        text=True,
        check=True,
    )
    (record,) = FileKeyStore(store).load().keys
    assert record.expires_at is not None
    assert low <= record.expires_at - time.time() <= high
    listed = subprocess.run(
        [*llmops, "list", "--store", str(store)], capture_output=True, text=True, check=True
    )
    assert "EXPIRES" in listed.stdout


@pytest.mark.parametrize(
    "options",
    [
        ["--expires-in", "30x"],
        ["--expires-in", "0d"],
        ["--expires-at", "2001-01-01"],
        ["--expires-at", "soon"],
        ["--expires-in", "1d", "--expires-at", "2999-01-01"],
    ],
)
def test_keys_command_refuses_bad_expiries(tmp_path: Path, options: list[str]) -> None:
    store = tmp_path / "keys.json"
    create = [sys.executable, "-m", "llmops_cli", "keys", "create", "--tenant", "acme"]
    refused = subprocess.run(
        [*create, *options, "--store", str(store)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2, refused.stderr
    assert "expires" in refused.stderr
    assert not store.exists()

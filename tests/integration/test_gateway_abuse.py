"""Per-client-address abuse limits ahead of authentication, key expiry and the audit log.

The limits follow slowapi/limits' fixed-window semantics (``limits/strategies.py``,
``FixedWindowRateLimiter``): the N+1th hit in a window is refused until the window ends,
which Retry-After states. X-Forwarded-For is read as the usual reverse proxies append it
(nginx ``$proxy_add_x_forwarded_for``: the nearest hop is the rightmost entry).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream

BAD_KEY = "llmops_000000000000_" + "x" * 43


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with stub_upstream() as url:
        yield url


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyStore:
    store = FileKeyStore(tmp_path_factory.mktemp("keys") / "keys.json")
    store.create(Tenant(name="bootstrap"))
    return store


@pytest.fixture(scope="module")
def gw(
    upstream: str, keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Memory limits; loopback is a trusted proxy, so X-Forwarded-For names the client."""
    with gateway(
        tmp_path_factory.mktemp("gw"),
        default_backend=upstream,
        keys_file=keys.path,
        client_rate_limit="20/minute",
        client_refused_key_limit="3/minute",
        trusted_proxies=["127.0.0.0/8"],
        docs_enabled=False,
    ) as running:
        yield running


def _models(gw: Gateway, key: str, client: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if client is not None:
        headers["X-Forwarded-For"] = f"198.51.100.7, {client}"
    return httpx.get(f"{gw.url}/v1/models", headers=headers, timeout=10)


def _assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 60
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "client_rate_limit_exceeded"


def test_refused_keys_throttle_the_address_even_for_a_valid_key(
    gw: Gateway, keys: FileKeyStore
) -> None:
    good = keys.create(Tenant(name="guessing"))[1]
    for _ in range(3):
        assert _models(gw, BAD_KEY, "203.0.113.1").status_code == 401
    _assert_throttled(_models(gw, BAD_KEY, "203.0.113.1"))
    _assert_throttled(_models(gw, good, "203.0.113.1"))
    # Another client behind the same proxy is not affected.
    assert _models(gw, good, "203.0.113.2").status_code == 200


def test_every_request_counts_against_the_address(gw: Gateway, keys: FileKeyStore) -> None:
    good = keys.create(Tenant(name="flooding"))[1]
    answers = [_models(gw, good, "203.0.113.3").status_code for _ in range(21)]
    assert answers[:20] == [200] * 20
    assert answers[20] == 429


def test_chat_is_limited_before_authentication(gw: Gateway) -> None:
    for _ in range(3):
        response = httpx.post(
            f"{gw.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {BAD_KEY}", "X-Forwarded-For": "203.0.113.4"},
            json={"model": "stub-chat", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 401
    response = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {BAD_KEY}", "X-Forwarded-For": "203.0.113.4"},
        json={"model": "stub-chat", "messages": [{"role": "user", "content": "hi"}]},
    )
    _assert_throttled(response)


def test_grpc_counts_refused_keys_per_peer(gw: Gateway, keys: FileKeyStore) -> None:
    good = keys.create(Tenant(name="grpc-guessing"))[1]
    with grpc.insecure_channel(gw.grpc_target) as channel:
        stub = pb_grpc.GatewayStub(channel)
        forwarded = ("x-forwarded-for", "203.0.113.5")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListModels(
                    pb.ListModelsRequest(),
                    metadata=[("authorization", f"Bearer {BAD_KEY}"), forwarded],
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as throttled:
            stub.ListModels(
                pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {good}"), forwarded]
            )
        assert throttled.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_docs_pages_can_be_turned_off(gw: Gateway) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{gw.url}{path}").status_code == 404


def test_expired_keys_are_refused_and_audited(gw: Gateway, keys: FileKeyStore) -> None:
    record, key = keys.create(Tenant(name="expiring"), expires_at=time.time() - 1)
    response = _models(gw, key, "203.0.113.6")
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]
    revoked, revoked_key = keys.create(Tenant(name="revoked"))
    keys.revoke(revoked.id)
    assert _models(gw, revoked_key, "203.0.113.6").status_code == 401
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in gw.log.read_text().splitlines() if "{" in line]
        audits = {
            line.get("reason"): line for line in lines if line.get("event") == "api key refused"
        }
        if {"expired", "revoked"} <= set(audits) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert audits["expired"]["key_id"] == record.id
    assert audits["expired"]["tenant"] == "expiring"
    assert audits["revoked"]["key_id"] == revoked.id
    text = gw.log.read_text()
    assert key.split("_", 2)[2] not in text
    assert revoked_key.split("_", 2)[2] not in text


def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    upstream: str, keys: FileKeyStore, tmp_path: Path
) -> None:
    with gateway(
        tmp_path, default_backend=upstream, keys_file=keys.path, client_refused_key_limit="2/minute"
    ) as untrusting:
        for client in ("203.0.113.7", "203.0.113.8"):
            assert _models(untrusting, BAD_KEY, client).status_code == 401
        _assert_throttled(_models(untrusting, BAD_KEY, "203.0.113.9"))


def test_redis_shares_the_counts_between_replicas(
    upstream: str, keys: FileKeyStore, redis_url: str, tmp_path: Path
) -> None:
    settings = {
        "default_backend": upstream,
        "keys_file": keys.path,
        "redis_url": redis_url,
        "client_refused_key_limit": "2/minute",
        "trusted_proxies": ["127.0.0.1"],
    }
    with gateway(tmp_path, **settings) as first, gateway(tmp_path, **settings) as second:
        assert _models(first, BAD_KEY, "203.0.113.10").status_code == 401
        assert _models(second, BAD_KEY, "203.0.113.10").status_code == 401
        throttled = _models(first, BAD_KEY, "203.0.113.10")
        _assert_throttled(throttled)
        assert "too many refused API keys" in throttled.json()["error"]["message"]

"""The same bad request gets the same error over REST and gRPC, counted the same way.

Both adapters make one call into the core (`GatewayCore.generate`); one REST handler and one
gRPC interceptor turn its `GatewayError` into a status. gRPC's codes follow the mapping its
own HTTP gateway uses (grpc-gateway's runtime/errors.go ``HTTPStatusFromCode``, read the
other way), with a backend's 5xx as UNAVAILABLE (the backend failed, not the gateway).
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from tests.integration.gateway_fixtures import (
    Gateway,
    keys_fixture,  # noqa: F401 (the fixture "keys")
    stub_gateway,
    upstream_fixture,  # noqa: F401 (the fixture "upstream")
)

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
}


@pytest.fixture(scope="module")
def gw(
    upstream: str, redis_url: str, keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with stub_gateway(upstream, redis_url, keys, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def stub(gw: Gateway) -> Iterator[pb_grpc.GatewayStub]:
    with grpc.insecure_channel(gw.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb_grpc.GatewayStub(channel)


@dataclass(frozen=True)
class Case:
    """A bad request: the key's tenant, what the request sets, and the status REST gives."""

    status: int
    limits: dict[str, object] | None = field(default_factory=dict)
    """The tenant's limits; None sends no key."""
    authorization: str | None = None
    """Sent instead of the tenant's key."""
    model: str = "stub-chat"
    max_tokens: int = 5
    extra: Callable[[], dict[str, object]] = dict
    """Fields passed through to the stub (made per request)."""
    first_ok: bool = False
    """A first request that succeeds uses up the tenant's limit."""


def _outage() -> dict[str, object]:
    return {"stub_unavailable": {"key": uuid.uuid4().hex, "times": 2}}


CASES = {
    "no key": Case(401, limits=None),
    "not a bearer key": Case(401, authorization="Basic abc"),
    "unknown key": Case(401, authorization="Bearer llmops_000000000000_nope"),
    "unknown model": Case(404, model="gpt-9"),
    "model the tenant may not use": Case(404, limits={"allowed_models": ["other"]}),
    "max_tokens below 1": Case(400, max_tokens=-3),
    "max_tokens over the tenant's limit": Case(
        400, limits={"tokens_per_minute": 1000}, max_tokens=5000
    ),
    "requests per minute spent": Case(429, limits={"requests_per_minute": 1}, first_ok=True),
    "daily budget spent": Case(429, limits={"tokens_per_day": 30}, max_tokens=20, first_ok=True),
    "backend's 429": Case(429, extra=lambda: {"stub_error": {"status": 429, "shape": "openai"}}),
    "backend's plain 500": Case(
        500, extra=lambda: {"stub_error": {"status": 500, "shape": "plain"}}
    ),
    "backend restarting": Case(503, extra=_outage),
}


def _authorization(keys: FileKeyStore, case: Case, tenant: str) -> str | None:
    if case.authorization is not None or case.limits is None:
        return case.authorization
    return f"Bearer {keys.create(Tenant(name=tenant, **case.limits))[1]}"  # type: ignore[arg-type]


def _rest(gw: Gateway, authorization: str | None, case: Case) -> httpx.Response:
    body = {
        "model": case.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": case.max_tokens,
        **case.extra(),
    }
    headers = {} if authorization is None else {"authorization": authorization}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def _grpc(stub: pb_grpc.GatewayStub, authorization: str | None, case: Case) -> pb.ChatCompletion:
    request = pb.ChatCompletionRequest(
        model=case.model,
        messages=[pb.Message(role="user", content="hi")],
        params=pb.SamplingParams(max_tokens=case.max_tokens),
    )
    extra = case.extra()
    if extra:
        struct = struct_pb2.Struct()
        struct.update(extra)
        request.extra.CopyFrom(struct)
    metadata = [] if authorization is None else [("authorization", authorization)]
    return stub.CreateChatCompletion(request, metadata=metadata, timeout=30)


def _requests(metrics_url: str, tenant: str, status: int) -> float:
    """``llmops_gateway_requests_total`` of one tenant and status."""
    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llmops_gateway_requests_total"
        and sample.labels.get("tenant") == tenant
        and sample.labels.get("status") == str(status)
    )


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_bad_request_gets_the_same_error_on_rest_and_grpc(
    gw: Gateway, stub: pb_grpc.GatewayStub, keys: FileKeyStore, name: str
) -> None:
    case = CASES[name]
    tenants = {protocol: f"parity-{protocol}-{uuid.uuid4().hex[:8]}" for protocol in "rg"}
    rest_key = _authorization(keys, case, tenants["r"])
    grpc_key = _authorization(keys, case, tenants["g"])
    if case.first_ok:
        assert _rest(gw, rest_key, case).status_code == 200
        assert _grpc(stub, grpc_key, case).usage.completion_tokens > 0

    response = _rest(gw, rest_key, case)
    with pytest.raises(grpc.RpcError) as raised:
        _grpc(stub, grpc_key, case)

    assert response.status_code == case.status, response.text
    assert raised.value.code() == CODES[case.status]
    message = response.json()["error"]["message"]
    assert raised.value.details().replace(tenants["g"], tenants["r"]) == message
    trailing = dict(raised.value.trailing_metadata() or ())
    assert ("retry-after" in trailing) == ("retry-after" in response.headers)
    if "retry-after" in trailing:
        assert abs(int(trailing["retry-after"]) - int(response.headers["retry-after"])) <= 1
    assert trailing.get("x-should-retry") == response.headers.get("x-should-retry")
    if case.limits is not None and case.authorization is None:
        # Counted once per request by the core, whichever adapter it came through.
        assert _requests(gw.metrics_url, tenants["r"], case.status) == 1
        assert _requests(gw.metrics_url, tenants["g"], case.status) == 1

"""Scale from zero: the gateway holds a request for a model with no serving replica.

The stub upstream answers a model put at zero as the graph's router does (503 with
`llmops_contract.SCALED_TO_ZERO_CODE`) until it is told to serve; the gateway holds the
request, quota reserved, and relays it once the model serves (issue 20, "Scale to zero").
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmops_contract import HELD_REQUESTS_METRIC
from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from tests.fakes.kube_api import KubeAPI
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream
from tests.integration.gateway_metrics import settled_tokens, wait_settled
from tests.integration.operator_fixtures import create, llmd_path, patch
from tests.integration.test_gateway_discovery import manifest, until

COLD = "stub-cold"
"""At zero in most tests; held up to the gateway's default hold deadline."""
BRIEF = "stub-brief"
"""At zero, with a 1 s hold deadline of its own (``hold_timeouts``)."""
MESSAGES = [{"role": "user", "content": "x"}]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with stub_upstream(models=("stub-chat", COLD, BRIEF)) as url:
        yield url


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyStore:
    return FileKeyStore(tmp_path_factory.mktemp("hold-keys") / "keys.json")


@pytest.fixture(scope="module")
def gw(
    upstream: str, keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    keys.create(Tenant(name="bootstrap"))
    with gateway(
        tmp_path_factory.mktemp("hold-gw"),
        default_backend=upstream,
        keys_file=keys.path,
        hold_timeout_s=30,
        hold_timeouts={BRIEF: 1.0},
    ) as running:
        yield running


@pytest.fixture
def cold(upstream: str) -> Iterator[Callable[[bool], None]]:
    """Puts COLD and BRIEF at zero; yields a function that makes COLD serve (or not)."""

    def serve(serving: bool, model: str = COLD) -> None:
        httpx.post(f"{upstream}/stub/scale", json={"model": model, "serving": serving})

    serve(False)
    serve(False, BRIEF)
    try:
        yield serve
    finally:
        serve(True)
        serve(True, BRIEF)


def _tenant(keys: FileKeyStore) -> tuple[str, str]:
    name = f"hold-{uuid.uuid4().hex[:8]}"
    return name, keys.create(Tenant(name=name))[1]


def _samples(gw: Gateway, name: str, **labels: str) -> float:
    """The sum of a metric's samples matching ``labels``."""
    text = httpx.get(gw.metrics_url).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _held(gw: Gateway, model: str = COLD) -> float:
    return _samples(gw, HELD_REQUESTS_METRIC, model=model)


def _holds(gw: Gateway, outcome: str, model: str = COLD) -> float:
    return _samples(gw, "llmops_gateway_hold_seconds_count", model=model, outcome=outcome)


def _until(check: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def _records(keys: FileKeyStore, tenant: str) -> list[dict[str, Any]]:
    """The tenant's usage records (usage.jsonl beside the key file, without Redis)."""
    path = keys.path.parent / "usage.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["tenant"] == tenant]


def _one_record(keys: FileKeyStore, tenant: str) -> dict[str, Any]:
    _until(lambda: bool(_records(keys, tenant)), "the usage record was written")
    time.sleep(0.3)  # a second record would land with the first flush
    records = _records(keys, tenant)
    assert len(records) == 1, records
    return records[0]


def _chat_with(client: openai.OpenAI, stream: bool, model: str) -> str:
    if stream:
        chunks = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(model=model, messages=MESSAGES)
    return reply.choices[0].message.content or ""


def _client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_for_a_model_at_zero_is_held_then_answered_and_charged_once(
    gw: Gateway, keys: FileKeyStore, cold: Callable[[bool], None], stream: bool
) -> None:
    """The held request waits (no response head, so the SDK's call has not returned) while
    the model is at zero, and gets the model's answer once it serves; the tenant is charged
    once, for the answer, and the hold is recorded as served."""
    name, key = _tenant(keys)
    served = _holds(gw, "served")
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(_chat_with, _client(gw, key), stream, COLD)
        _until(lambda: _held(gw) == 1, "the request is held")
        time.sleep(1.0)  # a few probes: still held, nothing answered
        assert not reply.done()
        assert _held(gw) == 1
        cold(True)
        text = reply.result(timeout=15)
    assert text.startswith("tok")
    _until(lambda: _held(gw) == 0, "the gauge is back to 0")
    assert _holds(gw, "served") == served + 1
    assert wait_settled(gw.metrics_url, name, 12) == 12
    record = _one_record(keys, name)
    assert (record["status"], record["code"], record["completion_tokens"]) == ("ok", 200, 12)


@pytest.mark.parametrize("stream", [False, True])
def test_grpc_calls_are_held_then_answered(
    gw: Gateway, keys: FileKeyStore, cold: Callable[[bool], None], stream: bool
) -> None:
    name, key = _tenant(keys)
    request = pb.ChatCompletionRequest(
        model=COLD,
        messages=[pb.Message(role="user", content="hi")],
        params=pb.SamplingParams(max_tokens=5),
    )
    metadata = [("authorization", f"Bearer {key}")]
    with grpc.insecure_channel(gw.grpc_target) as channel, ThreadPoolExecutor(1) as pool:
        stub = pb_grpc.GatewayStub(channel)
        if stream:
            reply = pool.submit(
                lambda: "".join(
                    c.choices[0].content
                    for c in stub.StreamChatCompletion(request, metadata=metadata, timeout=30)
                    if c.choices
                )
            )
        else:
            reply = pool.submit(
                lambda: (
                    stub.CreateChatCompletion(request, metadata=metadata, timeout=30)
                    .choices[0]
                    .message.content
                )
            )
        _until(lambda: _held(gw) == 1, "the call is held")
        time.sleep(0.5)
        assert not reply.done()
        cold(True)
        assert reply.result(timeout=15).startswith("tok tok tok tok tok")
    assert wait_settled(gw.metrics_url, name, 5) == 5
    assert _one_record(keys, name)["code"] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_past_the_hold_deadline_503_with_retry_after_and_nothing_charged(
    gw: Gateway, keys: FileKeyStore, cold: Callable[[bool], None], stream: bool
) -> None:
    """BRIEF's own deadline (1 s) passes: 503 in OpenAI's shape with Retry-After (the SDK's
    APIStatusError, openai/_client.py ``_make_status_error``, after no retries), the
    reservation released and nothing charged; the hold is recorded as expired."""
    name, key = _tenant(keys)
    expired = _holds(gw, "expired", BRIEF)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        _chat_with(_client(gw, key), stream, BRIEF)
    assert time.monotonic() - started >= 1.0
    error = caught.value
    assert error.status_code == 503
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    body = error.response.json()["error"]
    assert (body["code"], body["type"]) == ("model_cold_start_timeout", "server_error")
    assert _held(gw, BRIEF) == 0
    assert _holds(gw, "expired", BRIEF) == expired + 1
    record = _one_record(keys, name)
    assert (record["code"], record["prompt_tokens"], record["completion_tokens"]) == (503, 0, 0)
    assert settled_tokens(gw.metrics_url, name, "prompt") == 0


def test_grpc_past_the_hold_deadline_is_unavailable_with_retry_after(
    gw: Gateway, keys: FileKeyStore, cold: Callable[[bool], None]
) -> None:
    _, key = _tenant(keys)
    request = pb.ChatCompletionRequest(model=BRIEF, messages=[pb.Message(role="user", content="x")])
    with grpc.insecure_channel(gw.grpc_target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GatewayStub(channel).CreateChatCompletion(
            request, metadata=[("authorization", f"Bearer {key}")], timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "held 1 s" in (caught.value.details() or "")
    trailing = dict(caught.value.trailing_metadata() or ())
    assert 1 <= int(trailing["retry-after"]) <= 60


def test_many_held_requests_share_one_probe_and_all_get_answered(
    gw: Gateway, upstream: str, keys: FileKeyStore, cold: Callable[[bool], None]
) -> None:
    """50 held requests: while they wait, the router sees one probe at a time on a 0.5 s to
    2 s back-off (a few a second at most), not one poll per request; once the model serves,
    all of them are answered."""
    _, key = _tenant(keys)

    def answered() -> int:
        return int(httpx.get(f"{upstream}/stats").json()["cold_answers"].get(COLD, 0))

    with ThreadPoolExecutor(50) as pool:
        replies = [pool.submit(_chat_with, _client(gw, key), False, COLD) for _ in range(50)]
        _until(lambda: _held(gw) == 50, "50 requests held")
        before = answered()
        time.sleep(3.0)
        probes = answered() - before
        assert 1 <= probes <= 6, f"{probes} upstream probes in 3 s for 50 held requests"
        cold(True)
        texts = [reply.result(timeout=20) for reply in replies]
    assert all(text.startswith("tok") for text in texts)
    _until(lambda: _held(gw) == 0, "the gauge is back to 0")


def test_a_grpc_client_that_leaves_while_held_is_released_and_charged_nothing(
    gw: Gateway, keys: FileKeyStore, cold: Callable[[bool], None]
) -> None:
    """A cancelled call (the client went away) ends its hold: the gauge drops, the hold is
    recorded as cancelled, and its reservation is released with nothing charged."""
    name, key = _tenant(keys)
    cancelled = _holds(gw, "cancelled")
    request = pb.ChatCompletionRequest(model=COLD, messages=[pb.Message(role="user", content="x")])
    with grpc.insecure_channel(gw.grpc_target) as channel:
        call = pb_grpc.GatewayStub(channel).CreateChatCompletion.future(
            request, metadata=[("authorization", f"Bearer {key}")], timeout=30
        )
        _until(lambda: _held(gw) == 1, "the call is held")
        assert call.cancel()
        _until(lambda: _held(gw) == 0, "the cancelled call is no longer held")
    assert _holds(gw, "cancelled") == cancelled + 1
    record = _one_record(keys, name)
    assert (record["status"], record["prompt_tokens"], record["completion_tokens"]) == (
        "cancelled",
        0,
        0,
    )
    assert settled_tokens(gw.metrics_url, name, "prompt") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_rest_client_that_leaves_while_held_is_released_and_charged_nothing(
    gw: Gateway, keys: FileKeyStore, cold: Callable[[bool], None], stream: bool
) -> None:
    """The ASGI server does not stop a handler whose client left (uvicorn only reports
    ``http.disconnect`` to ``receive``): the gateway watches for it, so a held request whose
    client gave up is released at once, recorded cancelled, and charged nothing."""
    name, key = _tenant(keys)
    cancelled = _holds(gw, "cancelled")
    body = {"model": COLD, "messages": MESSAGES, "stream": stream}
    headers = {"authorization": f"Bearer {key}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the request is held
        httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=2.0)
    _until(lambda: _held(gw) == 0, "the request whose client left is no longer held", 10)
    assert _holds(gw, "cancelled") == cancelled + 1
    record = _one_record(keys, name)
    assert (record["status"], record["prompt_tokens"], record["completion_tokens"]) == (
        "cancelled",
        0,
        0,
    )
    assert settled_tokens(gw.metrics_url, name, "prompt") == 0


def test_another_model_keeps_answering_while_one_is_held(
    gw: Gateway, keys: FileKeyStore, cold: Callable[[bool], None]
) -> None:
    _, key = _tenant(keys)
    client = _client(gw, key)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_chat_with, client, False, COLD)
        _until(lambda: _held(gw) == 1, "the request is held")
        started = time.monotonic()
        assert _chat_with(client, True, "stub-chat").startswith("tok")
        assert time.monotonic() - started < 2
        assert _held(gw) == 1
        assert not held.done()
        cold(True)
        assert held.result(timeout=15).startswith("tok")


@pytest.mark.kmock(cls=KubeAPI)
async def test_discovery_at_zero_ready_replicas_holds_before_any_upstream_call(
    kmock: KubeAPI, tmp_path: Path
) -> None:
    """A model whose LLMDeployment status reports ``readyReplicas: 0`` is routed but held
    without calling its graph; when the status reports a ready replica (read through the
    watch), the held request is relayed."""
    store = FileKeyStore(tmp_path / "keys.json")
    secret = store.create(Tenant(name="team"))[1]
    with ExitStack() as stack:
        graph = stack.enter_context(stub_upstream(models=("alpha",)))

        async def report(ready_replicas: int) -> None:
            models = [{"name": "alpha", "state": "Ready", "readyReplicas": ready_replicas}]
            await patch(
                kmock,
                llmd_path("one", "team-a") + "/status",
                {"status": {"endpoints": {"http": graph}, "models": models}},
            )

        await create(kmock, manifest("one", ["alpha"]))
        await report(0)
        gw = stack.enter_context(
            gateway(
                tmp_path,
                keys_file=store.path,
                discover_backends=True,
                kube_api_url=str(kmock.url),
                hold_timeout_s=30,
            )
        )
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=30) as client:

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await until(ready, "the gateway listed the LLMDeployments")
            listing = (await client.get("/v1/models")).json()
            assert [m["id"] for m in listing["data"]] == ["alpha"]
            body = {"model": "alpha", "messages": MESSAGES}
            reply = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))

            async def held() -> bool:
                return _held(gw, "alpha") == 1

            await until(held, "the request is held")
            await asyncio.sleep(1.0)
            assert not reply.done()
            assert (await client.get(f"{graph}/stats")).json()["requests"] == 0
            await report(1)
            answer = await asyncio.wait_for(reply, 15)
            assert answer.status_code == 200, answer.text
            assert (await client.get(f"{graph}/stats")).json()["requests"] == 1
            assert _holds(gw, "served", "alpha") == 1

"""A backend that is restarting (503) or drops connections: the gateway answers 503 with
Retry-After, never 500, retries once before the first byte, and charges the tenant once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from llmops_gateway.keys import FileKeyStore, Tenant
from tests.integration.gateway_fixtures import (
    Gateway,
    keys_fixture,  # noqa: F401 (the fixture "keys")
    stub_gateway,
    upstream_fixture,  # noqa: F401 (the fixture "upstream")
)
from tests.integration.gateway_metrics import settled_tokens, wait_settled

MESSAGES = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def gw(
    upstream: str, redis_url: str, keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with stub_gateway(upstream, redis_url, keys, tmp_path_factory) as running:
        yield running


def _tenant(keys: FileKeyStore) -> tuple[str, str]:
    name = f"tenant-{uuid.uuid4().hex[:8]}"
    return name, keys.create(Tenant(name=name))[1]


def _outage(times: int, drop: bool = False) -> dict[str, object]:
    return {"stub_unavailable": {"key": uuid.uuid4().hex, "times": times, "drop": drop}}


def _attempts(upstream: str, outage: dict[str, object]) -> int:
    key = outage["stub_unavailable"]["key"]  # type: ignore[index]
    return int(httpx.get(f"{upstream}/stats").json()["unavailable"].get(key, 0))


@pytest.mark.parametrize("stream", [False, True])
def test_a_restarting_backend_is_503_with_retry_after(
    gw: Gateway, upstream: str, keys: FileKeyStore, stream: bool
) -> None:
    """Two 503s in a row (the gateway's attempt and its one retry) reach the client as 503
    with Retry-After in OpenAI's shape; a 500 would read as a bug (issue 21)."""
    name, key = _tenant(keys)
    outage = _outage(2)
    response = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "stub-chat", "messages": MESSAGES, "stream": stream, **outage},
        timeout=30,
    )
    assert response.status_code == 503, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 60
    error = response.json()["error"]
    assert "restarting" in error["message"]
    assert error["type"] == "server_error"
    assert _attempts(upstream, outage) == 2
    assert settled_tokens(gw.metrics_url, name) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_one_503_is_retried_by_the_gateway_before_the_first_byte(
    gw: Gateway, upstream: str, keys: FileKeyStore, stream: bool
) -> None:
    name, key = _tenant(keys)
    outage = _outage(1)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="stub-chat", messages=MESSAGES, stream=True, extra_body=outage
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        reply = client.chat.completions.create(
            model="stub-chat", messages=MESSAGES, extra_body=outage
        )
        text = reply.choices[0].message.content or ""
    assert text.startswith("tok")
    assert _attempts(upstream, outage) == 2
    assert wait_settled(gw.metrics_url, name, 12) == 12


@pytest.mark.parametrize("stream", [False, True])
def test_the_openai_sdk_rides_out_a_restart_and_the_tenant_pays_once(
    gw: Gateway, upstream: str, keys: FileKeyStore, stream: bool
) -> None:
    """The SDK retries a 503 itself, after its Retry-After (openai/_base_client.py,
    ``_should_retry`` and ``_calculate_retry_timeout``): with the backend answering 503 twice
    and then 200, the SDK's default client gets the answer and InternalServerError (which it
    raises for every 5xx, openai/_client.py ``_make_status_error``) never reaches the caller."""
    name, key = _tenant(keys)
    outage = _outage(2)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key)  # the default 2 retries
    raw = client.chat.completions.with_raw_response.create(
        model="stub-chat", messages=MESSAGES, stream=stream, extra_body=outage
    )
    if stream:
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = raw.parse().choices[0].message.content or ""
    assert text.startswith("tok")
    assert raw.retries_taken == 1
    assert _attempts(upstream, outage) == 3
    assert wait_settled(gw.metrics_url, name, 12) == 12
    prompt = settled_tokens(gw.metrics_url, name, "prompt")
    assert 0 < prompt < 50, "the failed attempts were charged their prompt"


def test_a_connection_dropped_before_the_head_is_retried_then_503(
    gw: Gateway, upstream: str, keys: FileKeyStore
) -> None:
    """A replica that dies as it takes the request closes the connection with no byte sent:
    once is retried, twice is 503 with Retry-After (aiohttp's ServerDisconnectedError was an
    unhandled 500 before)."""
    _, key = _tenant(keys)
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "stub-chat", "messages": MESSAGES}
    once = _outage(1, drop=True)
    response = httpx.post(
        f"{gw.url}/v1/chat/completions", headers=headers, json={**body, **once}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert _attempts(upstream, once) == 2
    twice = _outage(2, drop=True)
    response = httpx.post(
        f"{gw.url}/v1/chat/completions", headers=headers, json={**body, **twice}, timeout=30
    )
    assert response.status_code == 503, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert "unreachable" in response.json()["error"]["message"]

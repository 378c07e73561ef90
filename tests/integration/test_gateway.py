"""The gateway in front of a stub upstream, with real Redis: auth, limits, relay, usage."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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
from tests.integration.gateway_metrics import wait_settled


@pytest.fixture(scope="module")
def gw(
    upstream: str, redis_url: str, keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    keys.create(Tenant(name="bootstrap"))
    with stub_gateway(
        upstream, redis_url, keys, tmp_path_factory, max_body_bytes=4096, default_max_tokens=20
    ) as running:
        yield running


def _key(keys: FileKeyStore, **limits: object) -> str:
    name = f"tenant-{len(keys.load().keys)}"
    return keys.create(Tenant(name=name, **limits))[1]  # type: ignore[arg-type]


def _client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def test_openai_client_works_unchanged(gw: Gateway, keys: FileKeyStore) -> None:
    client = _client(gw, _key(keys))
    reply = client.chat.completions.create(
        model="stub-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert reply.choices[0].message.content == "tok tok tok tok tok"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 5
    chunks = list(
        client.chat.completions.create(
            model="stub-chat",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=7,
            stream=True,
        )
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 7
    # The gateway asks upstream for usage to settle it, but does not show it unasked.
    assert all(c.usage is None for c in chunks)
    completion = client.completions.create(model="stub-chat", prompt="x", max_tokens=3)
    assert completion.choices[0].text == "tok tok tok"
    vectors = client.embeddings.create(model="stub-embed", input=["a", "b"])
    assert len(vectors.data) == 2


def test_stream_usage_is_shown_when_asked(gw: Gateway, keys: FileKeyStore) -> None:
    chunks = list(
        _client(gw, _key(keys)).chat.completions.create(
            model="stub-chat",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing API key"),
        ("Basic abc", "must be 'Bearer <key>'"),
        ("Bearer llmops_000000000000_nope", "invalid API key"),
        ("Bearer sk-not-ours", "invalid API key"),
    ],
)
def test_bad_keys_are_401(gw: Gateway, header: str | None, fragment: str) -> None:
    headers = {"authorization": header} if header else {}
    response = httpx.post(f"{gw.url}/v1/chat/completions", headers=headers, json={})
    assert response.status_code == 401
    assert fragment in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "authentication_error"


def test_revoked_key_is_refused_at_once(gw: Gateway, keys: FileKeyStore) -> None:
    key = _key(keys)
    client = _client(gw, key)
    assert client.models.list().data
    record = next(r for r in keys.load().keys if key.startswith(f"llmops_{r.id}_"))
    keys.revoke(record.id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.models.list()


def test_models_lists_only_what_the_key_may_use(gw: Gateway, keys: FileKeyStore) -> None:
    """OpenAI answers 404 model_not_found for a model the key may not use, as for one that
    does not exist: the gateway must not reveal the models of other tenants (no 403)."""
    client = _client(gw, _key(keys, allowed_models=["stub-chat"]))
    assert [m.id for m in client.models.list()] == ["stub-chat"]
    with pytest.raises(openai.NotFoundError) as hidden:
        client.embeddings.create(model="stub-embed", input="x")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="gpt-9", input="x")
    assert hidden.value.code == unknown.value.code == "model_not_found"
    assert hidden.value.message.replace("stub-embed", "gpt-9") == unknown.value.message


def test_unknown_model_is_404(gw: Gateway, keys: FileKeyStore) -> None:
    with pytest.raises(openai.NotFoundError, match="'gpt-9' does not exist") as raised:
        _client(gw, _key(keys)).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.body == {
        "message": "The model 'gpt-9' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_models_retrieve(gw: Gateway, keys: FileKeyStore) -> None:
    """The `openai` SDK's models.retrieve is GET /v1/models/{id} (openai/resources/models.py)."""
    client = _client(gw, _key(keys, allowed_models=["stub-chat"]))
    model = client.models.retrieve("stub-chat")
    assert (model.id, model.object) == ("stub-chat", "model")
    for name in ("stub-embed", "gpt-9"):
        with pytest.raises(openai.NotFoundError) as raised:
            client.models.retrieve(name)
        assert raised.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        _client(gw, "llmops_000000000000_nope").models.retrieve("stub-chat")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing-here", 404),
        ("POST", "/v1/assistants", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
def test_every_error_is_openai_shaped(
    gw: Gateway, keys: FileKeyStore, method: str, path: str, status: int
) -> None:
    """OpenAI answers unknown URLs and wrong methods with its error object, never FastAPI's
    {"detail": ...}; SDKs read error.message from it."""
    response = httpx.request(method, f"{gw.url}{path}", headers={"x-request-id": "rid-1"})
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert method in body["error"]["message"]
    assert path in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    assert body["request_id"] == "rid-1"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_null_is_accepted_where_openai_accepts_it(
    gw: Gateway, keys: FileKeyStore, path: str
) -> None:
    """OpenAI's request schemas mark these fields nullable (the SDKs send null for unset
    values in some languages); the default then applies."""
    nulls = {
        "stream": None,
        "stream_options": None,
        "n": None,
        "max_tokens": None,
        "max_completion_tokens": None,
        "user": None,
        "temperature": None,
    }
    prompt = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    response = httpx.post(
        f"{gw.url}{path}",
        headers={"authorization": f"Bearer {_key(keys)}"},
        json={"model": "stub-chat", **prompt, **nulls},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0


def test_exhausted_daily_budget_is_insufficient_quota_and_not_retried(
    gw: Gateway, keys: FileKeyStore
) -> None:
    """OpenAI answers a spent budget with 429 type insufficient_quota; the `openai` SDK does
    not retry when the response says `x-should-retry: false` (openai/_base_client.py,
    _should_retry), whatever its max_retries."""
    sent: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    client = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=_key(keys, tokens_per_day=20),
        max_retries=2,
        http_client=http,
    )
    client.completions.create(model="stub-chat", prompt="x", max_tokens=12)
    sent.clear()
    with pytest.raises(openai.RateLimitError) as raised:
        client.completions.create(model="stub-chat", prompt="x", max_tokens=12)
    assert sent == ["/v1/completions"]
    assert raised.value.code == "insufficient_quota"
    assert raised.value.type == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert int(raised.value.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1]", 400, "JSON object"),
        (b'{"model": "stub-chat", "messages": "hi"}', 400, "messages"),
        (
            b'{"model": "stub-chat", "messages": [{"role": "user"}], "max_tokens": "x"}',
            400,
            "max_tokens",
        ),
        (b'{"model": "stub-chat", "messages": [], "max_tokens": 1}', 400, "messages"),
        (
            b'{"model": "stub-chat", "messages": [{"role": "user"}], "max_tokens": -1}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "stub-chat", "messages": [{"role": "user", "content": "'
            + b"x" * 5000
            + b'"}]}',
            413,
            "limit is 4096",
        ),
    ],
)
def test_bad_bodies_get_clear_errors(
    gw: Gateway, keys: FileKeyStore, body: bytes, status: int, fragment: str
) -> None:
    response = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {_key(keys)}", "content-type": "application/json"},
        content=body,
    )
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert response.json()["request_id"]


def test_max_tokens_over_the_tenant_limit_is_400(gw: Gateway, keys: FileKeyStore) -> None:
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        _client(gw, _key(keys, tokens_per_minute=1000)).chat.completions.create(
            model="stub-chat", messages=[{"role": "user", "content": "x"}], max_tokens=5000
        )


def test_request_limit_gives_429_with_retry_after(gw: Gateway, keys: FileKeyStore) -> None:
    key = _key(keys, requests_per_minute=3)
    statuses = []
    for _ in range(5):
        response = httpx.post(
            f"{gw.url}/v1/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "stub-chat", "prompt": "x", "max_tokens": 1},
        )
        statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 429, 429]
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.json()["error"]["code"] == "requests_per_minute"


def test_stream_usage_is_settled_so_capacity_returns(gw: Gateway, keys: FileKeyStore) -> None:
    # 1000 tokens a minute; each request reserves ~1 + 600 but uses ~1 + 10.
    client = _client(gw, _key(keys, tokens_per_minute=1000))
    for _ in range(5):
        stream = client.completions.create(
            model="stub-chat",
            prompt="x",
            max_tokens=600,
            stream=True,
            extra_body={"max_tokens": 600},
        )
        assert sum(1 for _ in stream) > 0
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="stub-chat", prompt="x", max_tokens=999)


def test_metrics_live_on_their_own_port_without_keys(gw: Gateway, keys: FileKeyStore) -> None:
    key = _key(keys)
    _client(gw, key).completions.create(model="stub-chat", prompt="x", max_tokens=2)
    with urllib.request.urlopen(gw.metrics_url) as response:
        text = response.read().decode()
    assert "llmops_gateway_requests_total" in text
    assert "llmops_gateway_tokens_total" in text
    assert key not in text
    assert key.split("_")[1] not in text
    api_metrics = httpx.get(f"{gw.url}/metrics")
    assert api_metrics.status_code == 404


def test_logs_never_contain_keys(gw: Gateway, keys: FileKeyStore) -> None:
    key = _key(keys)
    client = _client(gw, key)
    client.completions.create(model="stub-chat", prompt="x", max_tokens=1)
    httpx.post(f"{gw.url}/v1/completions", headers={"authorization": f"Bearer {key}x"}, json={})
    assert key not in gw.log.read_text()


def test_openapi_spec_documents_the_bodies(gw: Gateway) -> None:
    spec = httpx.get(f"{gw.url}/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    schema = chat["content"]["application/json"]["schema"]
    assert "messages" in json.dumps(schema)
    assert Path  # keeps the import for type hints in fixtures


def test_requests_without_max_tokens_are_capped_at_the_default(
    gw: Gateway, keys: FileKeyStore
) -> None:
    reply = _client(gw, _key(keys)).completions.create(
        model="stub-chat", prompt="x", extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 20


def test_an_engine_error_mid_stream_reaches_the_client_and_is_charged(
    gw: Gateway, keys: FileKeyStore
) -> None:
    """vLLM reports an engine failure inside a started stream as an error event, then [DONE]
    (serving_chat.py, create_streaming_error_response); the `openai` SDK raises APIError on
    it (openai/_streaming.py). The chunks relayed before it are charged."""
    name = f"tenant-{len(keys.load().keys)}"
    key = keys.create(Tenant(name=name))[1]
    stream = _client(gw, key).chat.completions.create(
        model="stub-chat",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=10,
        stream=True,
        extra_body={"stub_fail_after": 3},
    )
    texts: list[str | None] = []

    def read() -> None:
        texts.extend(chunk.choices[0].delta.content for chunk in stream)

    with pytest.raises(openai.APIError, match="EngineCore encountered an issue"):
        read()
    assert texts == ["", "tok ", "tok ", "tok "]
    assert wait_settled(gw.metrics_url, name, 3) == 3


@pytest.mark.parametrize("spacing", ["compact", "spaced"])
def test_streams_are_charged_whatever_the_backend_json_spacing(
    gw: Gateway, keys: FileKeyStore, spacing: str
) -> None:
    """vLLM writes compact JSON; servers built on json.dumps write `"usage": {` with a space.
    Both streams must settle their real usage, with or without the client asking for it."""
    name = f"tenant-{len(keys.load().keys)}"
    key = keys.create(Tenant(name=name))[1]
    chunks = list(
        _client(gw, key).completions.create(
            model="stub-chat",
            prompt="x",
            max_tokens=5,
            stream=True,
            extra_body={"stub_json": spacing, "ignore_eos": True},
        )
    )
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)
    assert wait_settled(gw.metrics_url, name, 5) == 5


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "shape", "error", "message"),
    [
        (500, "plain", openai.InternalServerError, "Internal Server Error"),
        (400, "flat", openai.BadRequestError, "stub failure 400"),
        (429, "openai", openai.RateLimitError, "stub failure 429"),
    ],
)
def test_backend_errors_reach_clients_openai_shaped(
    gw: Gateway,
    keys: FileKeyStore,
    stream: bool,
    status: int,
    shape: str,
    error: type[openai.APIStatusError],
    message: str,
) -> None:
    """Ray Serve's proxy answers a failed replica with plain text and older vLLM with a flat
    {"object": "error", ...}; the SDK reads error.message and error.type from OpenAI's shape
    (openai/_client.py, _make_status_error), so the gateway rewrites the others."""
    with pytest.raises(error) as raised:
        _client(gw, _key(keys)).chat.completions.create(
            model="stub-chat",
            messages=[{"role": "user", "content": "x"}],
            stream=stream,
            extra_body={"stub_error": {"status": status, "shape": shape}},
        )
    assert raised.value.status_code == status
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["message"] == message
    assert body["type"] == {"plain": "server_error", "flat": "invalid_request_error"}.get(
        shape, "stub_error"
    )

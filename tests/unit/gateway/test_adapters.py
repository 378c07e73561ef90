"""REST and gRPC are thin adapters over the core's one pipeline call.

As KServe's ``protocol/rest/`` and ``protocol/grpc/`` over ``protocol/dataplane.py``: each
endpoint converts its wire format, makes one call into the core and converts back. An adapter
that authenticates, admits, relays or settles itself is a second core; an ASGI dispatch in
front of FastAPI's routing keeps errors from its exception handlers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

import llmops_gateway
from llmops_gateway import errors
from llmops_gateway.admission import MemoryAdmission
from llmops_gateway.core import Admitted, Call, GatewayCore, Operation, Reply
from llmops_gateway.keys import FileKeyStore, KeyFile, Tenant
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.rest import create_app
from llmops_gateway.settings import GatewaySettings

PACKAGE = Path(llmops_gateway.__file__).parent
ADAPTERS = ("rest.py", "grpc_server.py")
STEPS = {
    "authenticate",
    "authenticate_client",
    "route",
    "served_models",
    "models_for",
    "model_info",
    "admit",
    "admit_generation",
    "post",
    "call",
    "settle",
    "spawn",
    "usage_record",
}
"""The core's steps: only its pipeline (`generate`, `list_models`, `retrieve_model`) may
sequence them."""
CORE_HELPERS = {"relay_sse", "parse_body", "validate_body", "estimate_tokens", "json_object"}


class _NoKeys:
    """A key store with no keys."""

    def load(self) -> KeyFile:
        return KeyFile()

    def version(self) -> object:
        return None


def _calls(source: str) -> set[tuple[str, str]]:
    """(receiver, name) of every method call in ``source``: ``("self.core", "generate")``."""
    return {
        (ast.unparse(node.func.value), node.func.attr)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


def _imported(source: str) -> set[str]:
    return {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_the_steps_named_are_the_cores() -> None:
    """Keeps the check below honest: a renamed step must be renamed here too."""
    assert all(callable(getattr(GatewayCore, step, None)) for step in STEPS)
    assert all(callable(getattr(GatewayCore, name)) for name in ("generate", "list_models"))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapters_make_one_call_into_the_core(adapter: str) -> None:
    source = (PACKAGE / adapter).read_text()
    calls = _calls(source)
    on_core = {name for receiver, name in calls if receiver in ("core", "self.core")}
    assert on_core & STEPS == set(), f"{adapter} runs pipeline steps itself"
    assert {"generate", "list_models"} <= on_core
    counted = {name for receiver, name in calls if "metrics" in receiver or "trac" in receiver}
    assert counted == set(), f"{adapter} counts or traces requests itself"
    assert _imported(source) & CORE_HELPERS == set(), f"{adapter} uses the core's internals"


def test_rest_posts_are_routed_by_fastapi() -> None:
    """The POST endpoints are FastAPI routes of the app uvicorn serves, so their errors pass
    through its exception handlers (no dispatch in front of it)."""
    core = GatewayCore(GatewaySettings(), _NoKeys(), MemoryAdmission(), GatewayMetrics.create())
    app = create_app(core)
    assert isinstance(app, FastAPI)
    posts = {
        route.path
        for route in app.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    }
    assert posts == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/tokenize",
        "/detokenize",
        "/v1/score",
        "/v1/rerank",
    }


class _Refusing(GatewayCore):
    """A core whose pipeline refuses every request with ``error``."""

    error: BaseException

    async def generate(self, operation: Operation, call: Call, body: object) -> Reply:
        raise self.error


async def _post(core: GatewayCore, path: str = "/v1/chat/completions") -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.post(path, json={}, headers={"x-request-id": "rid-7"})


async def test_a_core_error_reaches_the_one_handler() -> None:
    core = _Refusing(GatewaySettings(), _NoKeys(), MemoryAdmission(), GatewayMetrics.create())
    core.error = errors.insufficient_quota("the daily budget is spent", retry_after_s=30)
    response = await _post(core)
    assert response.status_code == 429
    assert response.json() == {
        "error": {
            "message": "the daily budget is spent",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        },
        "request_id": "rid-7",
    }
    assert response.headers["retry-after"] == "30"
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-request-id"] == "rid-7"


async def test_a_bug_in_the_pipeline_is_a_counted_500(tmp_path: Path) -> None:
    """The core logs it, counts it in llmops_gateway_requests_total and answers 500 in
    OpenAI's shape, for REST and gRPC alike."""

    class Broken(GatewayCore):
        async def admit_generation(self, *args: object, **kwargs: object) -> Admitted:
            raise RuntimeError("a bug")

    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="t"))
    metrics = GatewayMetrics.create()
    core = Broken(GatewaySettings(), store, MemoryAdmission(), metrics)
    transport = httpx.ASGITransport(app=create_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    counted = metrics.registry.get_sample_value(
        "llmops_gateway_requests_total",
        {"endpoint": "chat", "model": "unknown", "tenant": "t", "status": "500"},
    )
    assert counted == 1

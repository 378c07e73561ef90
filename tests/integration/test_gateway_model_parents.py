"""An adapter's base model as ``parent`` in the gateway's model lists.

vLLM lists a LoRA module with its base model as ``parent`` (vllm/entrypoints/openai/models/
serving.py, ``show_available_models``), and so does the graph's router (test_graph_lora.py
``test_adapters_are_listed_with_their_base_as_parent``): the gateway keeps it, from the default
backend's list or from an LLMDeployment's ``spec.models[].adapters``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import pytest

from llmops_gateway.discovery import adapter_parents
from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from tests.conftest import free_port
from tests.integration.gateway_fixtures import Gateway, gateway

BASE, ADAPTER = "smollm2", "smollm2-sql"
LISTED: list[dict[str, Any]] = [
    {"id": BASE, "object": "model", "created": 1, "owned_by": "llmops"},
    {"id": ADAPTER, "object": "model", "created": 1, "owned_by": "llmops", "parent": BASE},
]
"""The graph router's /v1/models for one base model and one adapter on it."""


class _Models(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps({"object": "list", "data": LISTED}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A graph ingress that only lists its models, on 127.0.0.1."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyStore:
    return FileKeyStore(tmp_path_factory.mktemp("parent-keys") / "keys.json")


@pytest.fixture(scope="module")
def gw(
    upstream: str, keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    keys.create(Tenant(name="bootstrap"))
    with gateway(
        tmp_path_factory.mktemp("parent-gw"), default_backend=upstream, keys_file=keys.path
    ) as running:
        yield running


def _headers(keys: FileKeyStore, name: str, models: list[str]) -> dict[str, str]:
    _, key = keys.create(Tenant(name=name, allowed_models=models))
    return {"authorization": f"Bearer {key}"}


def test_models_list_an_adapter_with_its_base_as_parent(gw: Gateway, keys: FileKeyStore) -> None:
    headers = _headers(keys, "everything", ["*"])
    listed = httpx.get(f"{gw.url}/v1/models", headers=headers, timeout=10).json()["data"]
    assert {entry["id"]: entry.get("parent") for entry in listed} == {BASE: None, ADAPTER: BASE}
    assert "parent" not in next(e for e in listed if e["id"] == BASE)
    one = httpx.get(f"{gw.url}/v1/models/{ADAPTER}", headers=headers, timeout=10).json()
    assert one == {"id": ADAPTER, "object": "model", "created": 0, "owned_by": "llmops"} | {
        "parent": BASE
    }
    base = httpx.get(f"{gw.url}/v1/models/{BASE}", headers=headers, timeout=10).json()
    assert "parent" not in base


def test_a_tenant_with_only_the_adapter_sees_its_parent_but_not_the_base(
    gw: Gateway, keys: FileKeyStore
) -> None:
    headers = _headers(keys, "adapter-only", [ADAPTER])
    listed = httpx.get(f"{gw.url}/v1/models", headers=headers, timeout=10).json()["data"]
    assert [(entry["id"], entry.get("parent")) for entry in listed] == [(ADAPTER, BASE)]
    refused = httpx.get(f"{gw.url}/v1/models/{BASE}", headers=headers, timeout=10)
    assert refused.status_code == 404


def test_grpc_lists_the_adapter_with_its_parent(gw: Gateway, keys: FileKeyStore) -> None:
    """ListModelsResponse's ``data`` gives each model's parent, as REST's /v1/models does
    (protos/llmops/v1/gateway.proto ModelInfo); ``models`` keeps the names alone."""
    metadata = list(_headers(keys, "grpc", ["*"]).items())
    with grpc.insecure_channel(gw.grpc_target) as channel:
        reply = pb_grpc.GatewayStub(channel).ListModels(
            pb.ListModelsRequest(), metadata=metadata, timeout=10
        )
    assert sorted(reply.models) == [BASE, ADAPTER]
    assert {m.id: m.parent for m in reply.data} == {BASE: "", ADAPTER: BASE}


def _llmd(name: str, created: str, models: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
        "spec": {
            "models": [
                {"name": model, "adapters": [{"name": a, "source": "hf://o/r"} for a in adapters]}
                for model, adapters in models.items()
            ]
        },
    }


def test_llmdeployments_give_each_adapter_its_base_model_the_older_one_first() -> None:
    """As discovery routes a name two deployments declare (`backends_from`: the older one
    keeps it), the parent comes from that deployment; a name that is a model there has none."""
    older = _llmd("a", "2026-01-01T00:00:00Z", {"llama": ["llama-sql"], "qwen": []})
    newer = _llmd("b", "2026-02-01T00:00:00Z", {"mistral": ["llama-sql", "qwen", "m-law"]})
    assert adapter_parents([newer, older]) == {"llama-sql": "llama", "m-law": "mistral"}

"""Model -> backend tables from LLMDeployment statuses."""

from __future__ import annotations

from typing import Any

from llmops_gateway.discovery import Backend, backends_from


def deployment(
    name: str,
    models: dict[str, str],
    *,
    url: str | None = "http://graph:8000",
    created: str = "2026-01-01T00:00:00Z",
    namespace: str = "ns",
    policy: str = "by-name",
) -> dict[str, Any]:
    status: dict[str, Any] = {"models": [{"name": m, "state": s} for m, s in models.items()]}
    if url:
        status["endpoints"] = {"http": url}
    return {
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": {"models": [{"name": m} for m in models], "router": {"policy": policy}},
        "status": status,
    }


def test_each_model_goes_to_its_deployments_endpoint_with_its_state() -> None:
    table = backends_from(
        [
            deployment("a", {"chat": "Ready", "code": "Loading"}, url="http://a:8000"),
            deployment("b", {"embed": "Ready"}, url="http://b:8000", namespace="other"),
        ]
    )
    assert table == {
        "chat": Backend("http://a:8000", "ns/a", "Ready"),
        "code": Backend("http://a:8000", "ns/a", "Loading"),
        "embed": Backend("http://b:8000", "other/b", "Ready"),
    }
    assert [name for name, b in table.items() if b.ready] == ["chat", "embed"]


def test_a_deployment_without_an_endpoint_yet_is_not_routed() -> None:
    assert backends_from([deployment("a", {"chat": "Pending"}, url=None)]) == {}


def test_a_model_missing_from_status_is_pending() -> None:
    obj = deployment("a", {"chat": "Ready"})
    obj["spec"]["models"].append({"name": "new"})
    assert backends_from([obj])["new"].state == "Pending"


def test_the_older_deployment_keeps_a_shared_model_name() -> None:
    old = deployment(
        "old", {"chat": "Ready"}, url="http://old:8000", created="2026-01-01T00:00:00Z"
    )
    new = deployment(
        "new", {"chat": "Ready"}, url="http://new:8000", created="2026-02-01T00:00:00Z"
    )
    assert backends_from([new, old])["chat"].url == "http://old:8000"


def test_auto_goes_to_a_semantic_router() -> None:
    table = backends_from(
        [
            deployment("plain", {"chat": "Ready"}, url="http://plain:8000"),
            deployment(
                "smart",
                {"geo": "Ready", "code": "Loading"},
                url="http://smart:8000",
                created="2026-03-01T00:00:00Z",
                policy="semantic",
            ),
        ]
    )
    assert table["auto"] == Backend("http://smart:8000", "ns/smart", "Ready")


def test_lora_adapters_route_to_their_base_models_deployment_in_its_state() -> None:
    """spec.models[].adapters (the CRD's LoRA adapters) are served by their own names on the
    base model's replicas: each routes to that deployment, ready or at zero as its base is."""
    obj = deployment("a", {"llama": "Ready", "mistral": "Ready"}, url="http://a:8000")
    obj["spec"]["models"][0]["adapters"] = [
        {"name": "llama-sql", "source": "hf://org/sql-lora"},
        {"name": "llama-legal", "source": "hf://org/legal-lora"},
    ]
    obj["status"]["models"][0]["readyReplicas"] = 0
    obj["status"]["models"][1]["readyReplicas"] = 2
    table = backends_from([obj])
    assert table["llama-sql"] == Backend("http://a:8000", "ns/a", "Ready", 0)
    assert table["llama-legal"] == table["llama"]
    assert table["mistral"].ready_replicas == 2
    assert set(table) == {"llama", "llama-sql", "llama-legal", "mistral"}

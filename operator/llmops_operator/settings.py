"""Operator process settings: environment variables ``LLMOPS_OPERATOR_*``, built in `main()`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_WORKER_IMAGE = "ghcr.io/llmops-dev/llmops-worker:0.1.0"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "llmops-system"


class OperatorSettings(BaseSettings):
    """Everything the operator process reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="LLMOPS_OPERATOR_", extra="forbid")

    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch (JSON list); empty watches the whole cluster.",
    )
    peering_name: str = Field(
        default="llmops",
        description="Kopf peering object shared by operator replicas: one is active, the "
        "others stand by and take over when it stops.",
    )
    standalone: bool = Field(
        default=False, description="Run without peering (one replica, or local development)."
    )
    priority: int = Field(
        default=0, description="Peering priority; the highest-priority replica is active."
    )
    worker_limit: int = Field(
        default=50, ge=1, le=10000, description="Most LLMDeployments reconciled at once."
    )
    converge_interval_s: float = Field(
        default=10.0,
        ge=0.5,
        description="While an object is not Ready, its pass runs at most this often; a status "
        "change of one of its Jobs, RayServices or ScaledObjects brings the next pass forward.",
    )
    converge_max_interval_s: float = Field(
        default=120.0,
        ge=0.5,
        description="While nothing changes (say, a long model download), the interval between "
        "passes doubles up to this.",
    )
    resync_interval_s: float = Field(
        default=300.0,
        ge=10.0,
        description="Every object is reconciled at least this often, even with no event.",
    )
    metrics_port: int = Field(
        default=9090, ge=0, le=65535, description="Prometheus metrics port (0: off)."
    )
    health_port: int = Field(
        default=8081, ge=0, le=65535, description="Liveness endpoint port /healthz (0: off)."
    )
    worker_image: str = Field(
        default=DEFAULT_WORKER_IMAGE,
        description="Ray + vLLM + llmops image for head and workers, unless a manifest sets one.",
    )
    loader_image: str = Field(
        default=DEFAULT_WORKER_IMAGE,
        description="Image of the model-cache loader Job, unless a manifest sets one.",
    )
    prometheus_url: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus that KEDA queries for the autoscaling triggers.",
    )
    otlp_traces_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP (protobuf) URL the graphs send spans to, e.g. "
        "http://otel-collector.monitoring:4318/v1/traces: every Ray pod gets the tracing "
        "environment (Ray Serve, the router and LLM spans, vLLM's own). null: no tracing.",
    )
    trace_sample: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of new traces a graph starts itself; requests through the gateway "
        "follow the gateway's sampling decision (its traceparent) whatever this is.",
    )
    network_policy: bool = Field(
        default=True,
        description="A NetworkPolicy per LLMDeployment: only the gateway reaches the graph's "
        "serve port, Prometheus its metrics, the KubeRay operator its dashboard, and the "
        "graph's own pods each other (needs a CNI that enforces NetworkPolicies).",
    )
    gateway_namespace: str = Field(
        default="",
        description="Namespace of the gateways allowed to call the graphs; empty: the "
        "operator's own namespace (its service account's; llmops-system outside a cluster).",
    )
    gateway_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "llmops",
            "app.kubernetes.io/component": "gateway",
        },
        description="Labels of the gateway pods allowed to call the graphs (JSON object).",
    )
    monitoring_namespace_labels: dict[str, str] = Field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "monitoring"},
        description="Labels of the namespaces whose pods (Prometheus) may scrape the graphs' "
        "metrics ports (JSON object).",
    )
    kuberay_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"},
        description="Labels of the KubeRay operator pods, in any namespace, that deploy Serve "
        "applications through the Ray dashboard (JSON object).",
    )
    log_format: Literal["json", "console"] = Field(
        default="json", description="json for log collectors, console for people."
    )

    def graph_gateway_namespace(self) -> str:
        """Where the gateways that may call the graphs run."""
        if self.gateway_namespace:
            return self.gateway_namespace
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or DEFAULT_NAMESPACE
        except OSError:
            return DEFAULT_NAMESPACE

"""PromQL for the autoscaling triggers, defined once for KEDA, the rules and the dashboards.

Label conventions: Ray and vLLM series are scraped by the deployment's PodMonitor, which copies
the pod label ``llmops.dev/deployment`` into ``llmops_deployment``; DCGM's exporter labels its
series with the GPU's ``namespace`` and ``pod`` only, so GPU queries match the worker pods by
name (KubeRay names them ``<rayservice>-raycluster-<id>-<group>-worker-<id>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# vLLM metrics as Ray exports them: "vllm:" becomes "ray_vllm_".
VLLM_WAITING = "ray_vllm_num_requests_waiting"
VLLM_RUNNING = "ray_vllm_num_requests_running"
VLLM_KV_CACHE_USAGE = "ray_vllm_kv_cache_usage_perc"
SERVE_QUEUED = "ray_serve_deployment_queued_queries"
DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
LLM_DEPLOYMENT_PREFIX = "llm-"

MetricType = Literal["Value", "AverageValue"]


@dataclass(frozen=True)
class TriggerQuery:
    """One autoscaling signal: its PromQL and how KEDA compares it to the target."""

    name: str
    query: str
    metric_type: MetricType


def _selector(namespace: str, deployment: str) -> str:
    return f'namespace="{namespace}", llmops_deployment="{deployment}"'


def worker_pod_regex(deployment: str) -> str:
    """Regex matching the GPU worker pods of one deployment (any Ray cluster generation)."""
    return f"{deployment}-raycluster-[a-z0-9]+-.*worker.*"


def gpu_utilization(namespace: str, deployment: str) -> TriggerQuery:
    """Average DCGM GPU utilisation (0-100) over the deployment's worker pods."""
    pods = worker_pod_regex(deployment)
    return TriggerQuery(
        "gpu-utilization",
        f'avg(avg_over_time({DCGM_GPU_UTIL}{{namespace="{namespace}", pod=~"{pods}"}}[1m]))',
        "Value",
    )


def queue_depth(namespace: str, deployment: str) -> TriggerQuery:
    """Requests waiting: in vLLM's scheduler plus in Serve's queues in front of the LLMs.

    KEDA divides it by the replica count (AverageValue), so the target is per replica. The
    Serve queue counts requests waiting for a replica, so a deployment scaled to zero still
    shows demand.
    """
    sel = _selector(namespace, deployment)
    serve = f'{sel}, deployment=~"{LLM_DEPLOYMENT_PREFIX}.*"'
    return TriggerQuery(
        "queue-depth",
        f"(sum({VLLM_WAITING}{{{sel}}}) or vector(0))"
        f" + (sum({SERVE_QUEUED}{{{serve}}}) or vector(0))",
        "AverageValue",
    )


def kv_cache_usage(namespace: str, deployment: str) -> TriggerQuery:
    """KV-cache usage in percent, averaged over the deployment's vLLM engines."""
    return TriggerQuery(
        "kv-cache-usage",
        f"avg({VLLM_KV_CACHE_USAGE}{{{_selector(namespace, deployment)}}}) * 100",
        "Value",
    )

"""PromQL for the autoscaling triggers, defined once for KEDA, the rules and the dashboards.

Label conventions: Ray and vLLM series are scraped by the deployment's PodMonitor, which copies
the pod labels ``llmops.dev/deployment`` and ``ray.io/group`` into ``llmops_deployment`` and
``ray_group``.

DCGM series carry no pod labels of ours. The exporter labels each GPU's series with the
``namespace`` and ``pod`` that hold the GPU (dcgm-exporter
internal/pkg/transformation/kubernetes.go); the GPU Operator scrapes it through a
ServiceMonitor that keeps ``honorLabels: false`` (gpu-operator
deployments/gpu-operator/values.yaml, assets/state-dcgm-exporter/0500_service_monitor.yaml),
so Prometheus renames those two to ``exported_namespace`` and ``exported_pod`` and sets
``namespace``/``pod`` to the exporter's own pod. GPU queries therefore match worker pods by
``exported_pod`` name, and also accept the ``namespace``/``pod`` form of a scrape that honours
the exporter's labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from llmops_contract import HELD_REQUESTS_METRIC, llm_deployment_name

# vLLM metrics as Ray exports them: "vllm:" becomes "ray_vllm_".
VLLM_WAITING = "ray_vllm_num_requests_waiting"
VLLM_RUNNING = "ray_vllm_num_requests_running"
VLLM_KV_CACHE_USAGE = "ray_vllm_kv_cache_usage_perc"
SERVE_QUEUED = "ray_serve_deployment_queued_queries"
DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"

MetricType = Literal["Value", "AverageValue"]


@dataclass(frozen=True)
class TriggerQuery:
    """One autoscaling signal: its PromQL and how KEDA compares it to the target."""

    name: str
    query: str
    metric_type: MetricType


def _selector(namespace: str, deployment: str) -> str:
    return f'namespace="{namespace}", llmops_deployment="{deployment}"'


# KubeRay's random suffixes come from k8s.io/apimachinery/pkg/util/rand.String: characters of
# this alphabet (no vowels, no 0, 1 or 3), for the cluster name and the pod name alike.
KUBERAY_RANDOM = "[bcdfghjklmnpqrstvwxz2456789]"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def worker_pods(deployments: str) -> str:
    """Regex of the Ray worker pod names of the RayServices ``deployments`` (a regex) names.

    KubeRay >= 1.4 names a RayService's cluster ``<rayservice>-<5 random>``, older releases
    ``<rayservice>-raycluster-<5 random>`` (ray-operator/controllers/ray/utils/util.go,
    GenerateRayClusterName; a cluster made before an upgrade keeps its name). A worker's
    generateName is ``<cluster>-<group>`` cut to 50 characters, then ``-worker-``
    (utils.PodName), to which the API server appends 5 random characters. The cut can take the
    group and part of the cluster suffix: long names end ``<rayservice>-<1 to 5>-worker-…``.

    Worker group names are not needed. What the pattern cannot tell apart is a RayService
    named ``<deployment>-<5 chars of KubeRay's alphabet>``.
    """
    suffix = f"{KUBERAY_RANDOM}{{5}}"
    cut = f"{KUBERAY_RANDOM}{{1,5}}"
    return f"({deployments})-(raycluster-)?({suffix}-.*|{cut})-worker-{suffix}"


def worker_pod_regex(deployment: str) -> str:
    """Regex of the worker pod names of one deployment, whatever cluster it runs on.

    Raises:
        ValueError: ``deployment`` is not a DNS label (it would need regex escaping).
    """
    if not _DNS_LABEL.fullmatch(deployment):
        raise ValueError(f"not a DNS label: {deployment!r}")
    return worker_pods(deployment)


# KubeRay cuts a worker's generateName, `<cluster>-<group>`, to this many characters
# (ray-operator/controllers/ray/utils/util.go, PodName / CheckName).
POD_PREFIX_MAX = 50
# KubeRay < 1.4 refused longer RayService names (its `-raycluster-` infix needed the room).
OLD_NAME_MAX_LENGTH = 36


def group_worker_pods(deployment: str, group: str) -> str:
    """Regex of the worker pod names of one worker group (one model) of one deployment.

    The group name follows ``<rayservice>-[raycluster-]<5 random>-`` in the name, cut where
    KubeRay cuts the generateName (`worker_pods`): a cut group matches by the part that is
    left, and where nothing of it is left (a RayService name of 43 or more characters) that
    naming's branch matches every worker of the deployment, as `worker_pod_regex` does.

    Raises:
        ValueError: ``deployment`` is not a DNS label or ``group`` not a model name.
    """
    if not _DNS_LABEL.fullmatch(deployment):
        raise ValueError(f"not a DNS label: {deployment!r}")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", group):
        raise ValueError(f"not a worker group name: {group!r}")
    suffix = f"{KUBERAY_RANDOM}{{5}}"
    cut = f"{KUBERAY_RANDOM}{{1,5}}"
    branches = []
    for cluster_infix in ("", "raycluster-"):
        if cluster_infix and len(deployment) > OLD_NAME_MAX_LENGTH:
            continue  # no cluster of the old naming can have this name
        before = len(deployment) + 1 + len(cluster_infix) + 5 + 1
        room = POD_PREFIX_MAX - before
        if room <= 0:  # nothing of the group is left in the name: every worker
            branches.append(f"{deployment}-{cluster_infix}({suffix}-.*|{cut})-worker-{suffix}")
            continue
        # A dot in a model name is literal; [.] needs no escaping inside a PromQL string.
        kept = group[:room].replace(".", "[.]")
        branches.append(f"{deployment}-{cluster_infix}{suffix}-{kept}-worker-{suffix}")
    return "|".join(branches)


def gpu_utilization(namespace: str, deployment: str, group: str | None = None) -> TriggerQuery:
    """Average DCGM GPU utilisation (0-100) over the GPUs of the deployment's worker pods, or
    of one worker group's (one model's) with ``group``.

    Series of the GPU Operator's scrape name the GPU's pod in ``exported_pod``; the second
    branch of the ``or`` reads a scrape with ``honorLabels: true``, where it is ``pod``.
    """
    pods = group_worker_pods(deployment, group) if group else worker_pod_regex(deployment)
    exported = f'exported_namespace="{namespace}", exported_pod=~"{pods}"'
    honored = f'namespace="{namespace}", pod=~"{pods}"'
    return TriggerQuery(
        "gpu-utilization",
        f"avg(avg_over_time({DCGM_GPU_UTIL}{{{exported}}}[1m])"
        f" or avg_over_time({DCGM_GPU_UTIL}{{{honored}}}[1m]))",
        "Value",
    )


def queue_depth(namespace: str, deployment: str, model: str) -> TriggerQuery:
    """Requests waiting for one model: in its vLLM engines' schedulers (vLLM labels its
    gauges with the served ``model_name``) plus in Serve's queue in front of its deployment.

    KEDA divides it by the replica count (AverageValue), so the target is per replica. The
    Serve queue counts requests waiting for a replica, so a model scaled to zero still
    shows demand.
    """
    sel = _selector(namespace, deployment)
    engines = f'{sel}, model_name="{model}"'
    serve = f'{sel}, deployment="{llm_deployment_name(model)}"'
    return TriggerQuery(
        "queue-depth",
        f"(sum({VLLM_WAITING}{{{engines}}}) or vector(0))"
        f" + (sum({SERVE_QUEUED}{{{serve}}}) or vector(0))",
        "AverageValue",
    )


def kv_cache_usage(namespace: str, deployment: str, model: str) -> TriggerQuery:
    """KV-cache usage in percent, averaged over one model's vLLM engines."""
    sel = f'{_selector(namespace, deployment)}, model_name="{model}"'
    return TriggerQuery("kv-cache-usage", f"avg({VLLM_KV_CACHE_USAGE}{{{sel}}}) * 100", "Value")


def held_requests(model: str) -> TriggerQuery:
    """Requests the gateway holds for a model with no serving replica (scaled to zero or
    starting): the gateway's gauge, by served model name. Activated above 0, it wakes the
    model; as an AverageValue it also counts as waiting demand per replica."""
    return TriggerQuery(
        "held-requests", f'sum({HELD_REQUESTS_METRIC}{{model="{model}"}})', "AverageValue"
    )

"""The HPA's replica arithmetic over the pods of a rendered LLMDeployment.

KEDA turns each trigger into an External metric of the HPA it owns: `Value` triggers become a
`target.value`, `AverageValue` triggers a `target.averageValue`. The HPA controller then
computes replicas as kubernetes pkg/controller/podautoscaler/replica_calculator.go does:

- Value (GetExternalMetricReplicas -> getUsageRatioReplicaCount): usageRatio = metric /
  target; from zero replicas ceil(usageRatio); otherwise the current count when
  |1 - usageRatio| <= tolerance (0.1 by default), else ceil(usageRatio x readyPodCount), where
  readyPodCount counts the Running and Ready pods the scale's label selector matches
  (getReadyPodsCount).
- AverageValue (GetExternalPerPodMetricReplicas): usageRatio = metric / (target x
  status replicas); the status count within tolerance, else ceil(metric / target). No pods.

For the LLMDeployment the selector is its scale subresource's status.selector,
render.worker_selector. The cluster below carries the labels a real one has: our renderer's
pod template labels (render.ray_service, render.cache_loader) under KubeRay's own
(ray-operator/controllers/ray/common/pod.go labelPod: ray.io/cluster, ray.io/node-type and
ray.io/group cannot be overridden; utils/constant.go: the head's group is "headgroup"), and
the Job controller's on the loader pod.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops_operator.render import render, worker_selector

ROOT = Path(__file__).parents[3]
TOLERANCE = 0.1  # the controller manager's --horizontal-pod-autoscaler-tolerance default


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str]
    phase: str = "Running"
    ready: bool = True


def matches(selector: str, pod_labels: dict[str, str]) -> bool:
    """Equality-based label selector string, as labels.Parse reads `k=v`, `k==v`, `k!=v`."""
    for requirement in selector.split(","):
        if "!=" in requirement:
            key, value = requirement.split("!=", 1)
            if pod_labels.get(key.strip()) == value.strip():
                return False
            continue
        key, sep, value = requirement.partition("==" if "==" in requirement else "=")
        if not sep or any(c in requirement for c in "()!"):
            raise ValueError(f"not an equality-based requirement: {requirement!r}")
        if pod_labels.get(key.strip()) != value.strip():
            return False
    return True


def ready_pod_count(pods: list[Pod], selector: str) -> int:
    """getReadyPodsCount: Running and Ready pods the selector matches."""
    return sum(1 for p in pods if matches(selector, p.labels) and p.phase == "Running" and p.ready)


def value_replicas(
    current: int, metric: float, target: float, pods: list[Pod], selector: str
) -> int:
    """GetExternalMetricReplicas for a `Value` target."""
    usage_ratio = metric / target
    if current == 0:
        return math.ceil(usage_ratio)
    if abs(1.0 - usage_ratio) <= TOLERANCE:
        return current
    return math.ceil(usage_ratio * ready_pod_count(pods, selector))


def average_value_replicas(status_replicas: int, metric: float, target: float) -> int:
    """GetExternalPerPodMetricReplicas for an `AverageValue` target."""
    usage_ratio = metric / (target * status_replicas)
    if abs(1.0 - usage_ratio) > TOLERANCE:
        return math.ceil(metric / target)
    return status_replicas


# --- a running LLMDeployment of two models --------------------------------------------------

MANIFEST = ROOT / "deploy" / "examples" / "semantic-routing.yaml"
CLUSTER = "assistants-x7k2p"  # KubeRay >= 1.4: <rayservice>-<5 random>


def kuberay_pod(template: dict[str, Any], node_type: str, group: str, name: str) -> Pod:
    """A pod as KubeRay's labelPod labels it: its defaults, the template's, then its own keys."""
    pod_labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/identifier": f"{CLUSTER}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
        **template["metadata"]["labels"],
        "ray.io/cluster": CLUSTER,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
    }
    return Pod(name, pod_labels)


def cluster(replicas: int) -> tuple[str, list[str], list[Pod]]:
    """Name, models and pods of the example at ``replicas``: head, each model's workers and a
    loader that is caching a new source (a Running Job pod is Ready)."""
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["spec"]["replicas"] = replicas
    # A shared cache, filled by a loader Job: its pod carries the deployment label too.
    manifest["spec"]["cache"] = {**manifest["spec"].get("cache", {}), "accessMode": "ReadWriteMany"}
    children = {child["kind"]: child for child in render(manifest)}
    ray = children["RayService"]["spec"]["rayClusterConfig"]
    head = ray["headGroupSpec"]["template"]
    pods = [kuberay_pod(head, "head", "headgroup", f"{CLUSTER}-head-8ljvs")]
    pods[0].labels["ray.io/serve"] = "true"  # the RayService controller's, on the active head
    for group in ray["workerGroupSpecs"]:
        for suffix in ["bc4df", "zz9nt", "h5f2d"][:replicas]:
            name = f"{CLUSTER}-{group['groupName']}"[:50] + f"-worker-{suffix}"
            pods.append(kuberay_pod(group["template"], "worker", group["groupName"], name))
    loader = children["Job"]
    job_name = loader["metadata"]["name"]
    job_labels = {
        **loader["spec"]["template"]["metadata"]["labels"],
        "batch.kubernetes.io/job-name": job_name,
        "job-name": job_name,
        "batch.kubernetes.io/controller-uid": "5f0e3c1a-7a4b-4c1e-9d2f-0a1b2c3d4e5f",
        "controller-uid": "5f0e3c1a-7a4b-4c1e-9d2f-0a1b2c3d4e5f",
    }
    pods.append(Pod(f"{job_name}-q7wzt", job_labels))
    name = manifest["metadata"]["name"]
    return name, [group["groupName"] for group in ray["workerGroupSpecs"]], pods


def test_the_cluster_has_a_head_two_models_and_a_loader() -> None:
    name, models, pods = cluster(replicas=2)
    assert len(models) == 2
    node_types = sorted(p.labels.get("ray.io/node-type", "-") for p in pods)
    assert node_types == ["-", "head", "worker", "worker", "worker", "worker"]
    # Every pod carries the deployment label: it cannot tell them apart.
    assert all(matches(f"llmops.dev/deployment={name}", p.labels) for p in pods)


@pytest.mark.parametrize("model_index", [0, 1])
def test_the_scale_selector_counts_one_replica_per_pod(model_index: int) -> None:
    for replicas in (1, 2, 3):
        name, models, pods = cluster(replicas)
        assert ready_pod_count(pods, worker_selector(name, models[model_index])) == replicas


def test_value_metric_asks_for_what_the_ratio_says() -> None:
    # GPU utilisation at 90% against a 60% target on 2 replicas: 1.5 x 2 -> 3.
    name, models, pods = cluster(replicas=2)
    selector = worker_selector(name, models[0])
    assert value_replicas(2, 90, 60, pods, selector) == 3
    # Below the target it scales down by the same arithmetic: 0.5 x 2 -> 1.
    assert value_replicas(2, 30, 60, pods, selector) == 1


def test_the_deployment_label_alone_inflates_a_value_decision() -> None:
    # The selector before: llmops.dev/deployment=<name> also counts the head, the other
    # model's workers and the loader, 6 pods for 2 replicas.
    name, models, pods = cluster(replicas=2)
    new = value_replicas(2, 90, 60, pods, worker_selector(name, models[0]))
    old = value_replicas(2, 90, 60, pods, f"llmops.dev/deployment={name}")
    assert (new, old) == (3, 9)
    assert old >= 2 * new


def test_value_metric_within_tolerance_and_from_zero() -> None:
    name, models, pods = cluster(replicas=2)
    selector = worker_selector(name, models[0])
    assert value_replicas(2, 63, 60, pods, selector) == 2  # |1 - 1.05| <= 0.1
    assert value_replicas(0, 90, 60, pods, selector) == 2  # ceil(1.5), no pods involved


def test_average_value_metric_ignores_pods() -> None:
    # Queue depth 12 against 5 per replica: ceil(12 / 5) whatever the selector matches.
    assert average_value_replicas(2, 12, 5) == 3
    assert average_value_replicas(3, 14, 5) == 3  # 14 / 15 is within tolerance


def test_selector_parser_reads_kubernetes_forms() -> None:
    pod_labels = {"a": "1", "b": "2"}
    assert matches("a=1,b==2", pod_labels)
    assert not matches("a=1,b!=2", pod_labels)
    assert matches("c!=3", pod_labels)
    with pytest.raises(ValueError, match="equality-based"):
        matches("a in (1)", pod_labels)

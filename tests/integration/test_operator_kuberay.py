"""The operator against KubeRay's real behaviour: random cluster names, the active cluster, and
worker bounds that KubeRay's change hash leaves out."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import (
    NAMESPACE,
    create,
    eventually,
    example,
    kuberay_creates_cluster,
    kuberay_starts_pods,
    live,
    llmd_path,
    patch,
    report_children_ready,
    running_operator,
)

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(90)]

LLM = "llm-llama-3-1-8b-instruct"
CODER, LLAMA = "qwen2.5-coder-7b-instruct", "llama-3.1-8b-instruct"  # semantic-routing's models
RAYCLUSTERS = "ray.io/v1/rayclusters"


def service_selector(api: KubeAPI, name: str) -> dict[str, str]:
    selector: dict[str, str] = live(api, "v1/services")[name]["spec"]["selector"]
    return selector


def worker_group(api: KubeAPI, cluster: str) -> dict[str, Any]:
    group: dict[str, Any] = live(api, RAYCLUSTERS)[cluster]["spec"]["workerGroupSpecs"][0]
    return group


async def test_graph_service_follows_the_active_cluster_not_the_pending_one(
    kmock: KubeAPI,
) -> None:
    """KubeRay >= 1.4 names clusters ``<rayservice>-<random>`` and labels a pending cluster's
    pods ``ray.io/serve=true`` too (ray-operator/controllers/ray/utils/util.go,
    rayservice_controller.go): the Service must select the active cluster by name."""
    kmock.install_crds()
    async with running_operator(kmock):
        await create(kmock, example("llama-8b-gpu"))
        await eventually(lambda: live(kmock, "v1/services").get("llama-8b"), what="Service")
        first = await report_children_ready(kmock, "llama-8b", None, [LLM])
        assert first.startswith("llama-8b-")
        assert "raycluster" not in first
        await eventually(
            lambda: service_selector(kmock, "llama-8b").get("ray.io/cluster") == first,
            what="the Service selecting the active cluster",
        )
        # An upgrade: KubeRay brings up a second cluster, pending until its models serve.
        second = await kuberay_creates_cluster(kmock, "llama-8b")
        status_path = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/llama-8b/status"
        pending = {"rayClusterName": second, "applicationStatuses": {}}
        await patch(kmock, status_path, {"status": {"pendingServiceStatus": pending}})
        await patch(kmock, llmd_path("llama-8b"), {"spec": {"replicas": 2}})  # a pass runs

        def observed_generation() -> bool:
            llmd = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["llama-8b"]
            return bool(llmd["status"]["observedGeneration"] == llmd["metadata"]["generation"])

        await eventually(observed_generation, what="a pass after the change")
        assert service_selector(kmock, "llama-8b")["ray.io/cluster"] == first
        # The new cluster serves: KubeRay moves it to activeServiceStatus.
        await report_children_ready(kmock, "llama-8b", None, [LLM], cluster=second)
        await eventually(
            lambda: service_selector(kmock, "llama-8b").get("ray.io/cluster") == second,
            what="the Service following the new active cluster",
        )


async def test_max_replicas_reaches_the_running_cluster(kmock: KubeAPI) -> None:
    """KubeRay leaves worker groups' Replicas/MinReplicas/MaxReplicas out of the hash that
    decides whether a RayService's cluster changed (ray-operator/controllers/ray/utils/
    util.go), so the operator patches the active RayCluster's bounds itself."""
    kmock.install_crds()
    manifest = example("llama-8b-gpu")
    manifest["spec"]["autoscaling"]["maxReplicas"] = 4
    async with running_operator(kmock):
        await create(kmock, manifest)
        await eventually(lambda: live(kmock, "ray.io/v1/rayservices").get("llama-8b"))
        cluster = await report_children_ready(kmock, "llama-8b", None, [LLM])
        assert worker_group(kmock, cluster)["maxReplicas"] == 4
        # KubeRay's autoscaler owns replicas; the operator must leave it alone.
        path = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/{cluster}"
        groups = live(kmock, RAYCLUSTERS)[cluster]["spec"]["workerGroupSpecs"]
        groups[0]["replicas"] = 3
        await patch(kmock, path, {"spec": {"workerGroupSpecs": groups}})
        await patch(kmock, llmd_path("llama-8b"), {"spec": {"autoscaling": {"maxReplicas": 8}}})
        await eventually(
            lambda: worker_group(kmock, cluster)["maxReplicas"] == 8,
            what="maxReplicas 8 on the running RayCluster",
        )
        group = worker_group(kmock, cluster)
        assert group["replicas"] == 3
        assert group["minReplicas"] == 1
        spec = live(kmock, "ray.io/v1/rayservices")["llama-8b"]["spec"]
        assert spec["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 8


async def test_status_replicas_count_ready_workers_of_the_active_cluster(kmock: KubeAPI) -> None:
    """status.replicas (the scale subresource's statusReplicasPath, which the HPA reads) is
    what serves: ready worker pods of the active cluster per model, selected by KubeRay's
    labels, for models whose Serve deployment is HEALTHY; the fewest over models."""
    kmock.install_crds()
    async with running_operator(kmock):
        await create(kmock, example("semantic-routing"))
        await eventually(lambda: live(kmock, "ray.io/v1/rayservices").get("assistants"))
        active = await kuberay_creates_cluster(kmock, "assistants")
        pending = await kuberay_creates_cluster(kmock, "assistants")
        await kuberay_starts_pods(kmock, active, CODER, ready=2, not_ready=1)
        await kuberay_starts_pods(kmock, active, LLAMA, ready=1, not_ready=2)
        await kuberay_starts_pods(kmock, pending, LLAMA, ready=3)
        await kuberay_starts_pods(kmock, pending, CODER, ready=3)
        deployments = [f"llm-{m.replace('.', '-')}" for m in (CODER, LLAMA)]
        await report_children_ready(kmock, "assistants", None, deployments, cluster=active)

        def replicas() -> tuple[int, dict[str, int]]:
            status = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["assistants"]["status"]
            return status["replicas"], {m["name"]: m["replicas"] for m in status["models"]}

        await eventually(
            lambda: replicas() == (1, {CODER: 2, LLAMA: 1}),
            what="replicas counted from the active cluster's ready workers",
        )
        # A model whose Serve deployment is unhealthy serves nothing, whatever its pods say.
        unhealthy = {"serveDeploymentStatuses": {deployments[1]: {"status": "UNHEALTHY"}}}
        status_path = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/assistants/status"
        body = {"status": {"activeServiceStatus": {"applicationStatuses": {"llmops": unhealthy}}}}
        await patch(kmock, status_path, body)
        await eventually(
            lambda: replicas() == (0, {CODER: 2, LLAMA: 0}),
            what="the unhealthy model counted as 0",
        )

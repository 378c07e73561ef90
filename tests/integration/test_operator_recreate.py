"""rollout.strategy Recreate against KubeRay's semantics.

KubeRay's upgradeStrategy ``None`` creates no new cluster when a RayService's cluster spec
changes (ray-operator/controllers/ray/rayservice_controller.go), and its change hash leaves out
worker replicas and bounds (utils/util.go, GenerateHashWithoutReplicasAndWorkersToDelete). With
Recreate the operator deletes an active cluster whose pods are of an older spec, so KubeRay
creates one from the current spec; bounds and replica changes never recreate.
"""

from __future__ import annotations

import pytest

from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import (
    create,
    eventually,
    example,
    live,
    llmd_path,
    patch,
    report_children_ready,
    running_operator,
)

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(90)]

LLM = "llm-llama-3-1-70b-instruct"
RAYCLUSTERS = "ray.io/v1/rayclusters"


def passed(api: KubeAPI, name: str) -> bool:
    llmd = live(api, "llmops.dev/v1alpha1/llmdeployments")[name]
    return bool(llmd.get("status", {}).get("observedGeneration") == llmd["metadata"]["generation"])


def events(api: KubeAPI, reason: str) -> list[str]:
    found = live(api, "v1/events").values()
    return [e.get("message", "") for e in found if e.get("reason") == reason]


async def test_recreate_replaces_a_cluster_of_an_older_spec_only(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock, converge_interval_s=0.5):
        manifest = example("llama-70b-tp")  # rollout.strategy: Recreate
        await create(kmock, manifest)
        # The last child a pass applies: every status the test reports has its object.
        await eventually(lambda: live(kmock, "keda.sh/v1alpha1/scaledobjects"), what="children")
        await eventually(lambda: live(kmock, "batch/v1/jobs"), what="the loader Job")
        job = next(iter(live(kmock, "batch/v1/jobs")))
        cluster = await report_children_ready(kmock, "llama-70b", job, [LLM])

        # Bounds and replicas: applied to the running cluster, never a reason to recreate.
        await patch(kmock, llmd_path("llama-70b"), {"spec": {"autoscaling": {"maxReplicas": 3}}})
        await eventually(
            lambda: (
                live(kmock, RAYCLUSTERS)[cluster]["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 3
            ),
            what="the new bound on the running cluster",
        )
        await patch(kmock, llmd_path("llama-70b") + "/scale", {"spec": {"replicas": 2}})
        await eventually(lambda: passed(kmock, "llama-70b"), what="a pass after the scale")
        assert cluster in live(kmock, RAYCLUSTERS)
        assert not events(kmock, "Recreating")

        # A pod-level change (memory) needs new pods: the stale cluster goes.
        models = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["llama-70b"]["spec"]["models"]
        models[0]["resources"]["memory"] = "320Gi"
        await patch(kmock, llmd_path("llama-70b"), {"spec": {"models": models}})
        await eventually(
            lambda: cluster not in live(kmock, RAYCLUSTERS), what="the stale cluster deleted"
        )
        await eventually(
            lambda: any(cluster in message for message in events(kmock, "Recreating")),
            what="a Recreating Event naming the cluster",  # Events are posted in the background
        )

        # KubeRay's new cluster, from the current spec, is left alone.
        fresh = await report_children_ready(kmock, "llama-70b", None, [LLM])
        await patch(kmock, llmd_path("llama-70b"), {"spec": {"replicas": 1}})
        await eventually(lambda: passed(kmock, "llama-70b"), what="a pass on the new cluster")
        assert fresh in live(kmock, RAYCLUSTERS)


async def test_new_cluster_strategy_never_deletes_a_cluster(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock, converge_interval_s=0.5):
        await create(kmock, example("llama-8b-gpu"))  # rollout.strategy: NewCluster
        await eventually(lambda: live(kmock, "keda.sh/v1alpha1/scaledobjects"), what="children")
        cluster = await report_children_ready(
            kmock, "llama-8b", None, ["llm-llama-3-1-8b-instruct"]
        )
        models = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["llama-8b"]["spec"]["models"]
        models[0]["resources"]["memory"] = "64Gi"
        await patch(kmock, llmd_path("llama-8b"), {"spec": {"models": models}})
        await eventually(lambda: passed(kmock, "llama-8b"), what="a pass after the change")
        assert cluster in live(kmock, RAYCLUSTERS)  # KubeRay rolls a new cluster itself
        assert not events(kmock, "Recreating")

"""Per-model scaling with the real Kopf operator against KMock: each model's LLMModel is its
scale target, and its /scale reaches that model's Serve deployment and worker group only.

The fake serves the LLMModel /scale subresource as the API server does for a custom resource
(k8s.io/apiextensions-apiserver/pkg/registry/customresource/etcd.go ScaleREST): GET, PUT (the
HPA's Update of the scale) and merge PATCH (`kubectl scale`), writing spec.replicas through an
ordinary update and recording the writer as the field's manager. Ray Serve applies a config
whose import_path and args are unchanged as deployment overrides only
(serve/_private/application_state.py apply_app_config), so the test checks that only the scaled
model's entry changes.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import (
    NAMESPACE,
    create,
    eventually,
    example,
    kuberay_starts_pods,
    live,
    llmd_path,
    patch,
    report_children_ready,
    running_operator,
)
from tests.schemas import assert_valid

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(120)]

MODELS = "llmops.dev/v1alpha1/llmmodels"
SCALED_OBJECTS = "keda.sh/v1alpha1/scaledobjects"


def model_path(name: str) -> str:
    return f"/apis/llmops.dev/v1alpha1/namespaces/{NAMESPACE}/llmmodels/{name}"


def serve_entries(api: KubeAPI) -> dict[str, dict[str, Any]]:
    rayservice = live(api, "ray.io/v1/rayservices")["team"]
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def groups(api: KubeAPI, obj: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    cluster = (obj or live(api, "ray.io/v1/rayservices")["team"])["spec"]
    cluster = cluster.get("rayClusterConfig", cluster)
    return {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def serve_count(api: KubeAPI, model: str) -> int:
    count: int = serve_entries(api)[f"llm-{model}"]["autoscaling_config"]["min_replicas"]
    return count


async def put_scale(api: KubeAPI, name: str, replicas: int) -> None:
    """What the HPA does: read the Scale, then Update it with the new spec.replicas.

    The Scale carries the object's resourceVersion, so a write of the operator's in between
    (its status) makes the Update a 409 Conflict; the HPA then records FailedRescale and tries
    again at its next sync with a fresh read (kubernetes pkg/controller/podautoscaler/
    horizontal.go, reconcileAutoscaler), as this does at once.
    """
    url = model_path(name) + "/scale"
    params = {"fieldManager": "kube-controller-manager"}
    for _ in range(5):
        async with api.get(url) as response:
            scale = await response.json()
        scale["spec"] = {"replicas": replicas}
        async with api.put(url, json=scale, params=params) as response:
            if response.status != 409:
                assert response.status == 200, await response.text()
                return
    raise AssertionError(f"{name}/scale: 5 conflicts in a row")


async def started(api: KubeAPI) -> None:
    await create(api, example("per-model-scaling"))
    await eventually(lambda: len(live(api, MODELS)) == 2, what="two LLMModels")
    await eventually(lambda: len(live(api, SCALED_OBJECTS)) == 2, what="two ScaledObjects")


async def test_two_models_scale_independently_through_their_scale_subresources(
    kmock: KubeAPI,
) -> None:
    kmock.install_crds()
    async with running_operator(kmock):
        await started(kmock)
        models = live(kmock, MODELS)
        assert models["team-chat"]["spec"]["replicas"] == 2
        assert models["team-code"]["spec"]["replicas"] == 0
        for obj in models.values():
            owner = obj["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["controller"]) == ("LLMDeployment", True)
        scaled = live(kmock, SCALED_OBJECTS)
        assert scaled["team-code"]["spec"]["scaleTargetRef"]["kind"] == "LLMModel"
        assert_valid([*models.values(), *scaled.values()])
        before_entries, before_groups = serve_entries(kmock), groups(kmock)
        # `kubectl scale llmmodel team-chat --replicas=4`: a merge patch of /scale.
        await patch(kmock, model_path("team-chat") + "/scale", {"spec": {"replicas": 4}})
        await eventually(lambda: serve_count(kmock, "chat") == 4, what="chat at 4 in Serve")
        after_entries, after_groups = serve_entries(kmock), groups(kmock)
        assert after_groups["chat"]["replicas"] == 4
        for unchanged in ("llm-code", "router", "encoder"):
            assert after_entries[unchanged] == before_entries[unchanged]
        assert after_groups["code"] == before_groups["code"]
        # KEDA's path: the HPA updates the other model's /scale (PUT).
        await put_scale(kmock, "team-code", 1)
        await eventually(lambda: serve_count(kmock, "code") == 1, what="code at 1 in Serve")
        assert serve_count(kmock, "chat") == 4
        assert groups(kmock)["code"]["replicas"] == 1
        # The operator never writes the count back over what the scale set.
        llmd = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["team"]
        await eventually(
            lambda: llmd_status(kmock).get("replicasSummary") == "chat 0/4, code 0/1",
            what="the summary (ready/desired per model)",
        )
        desired = {m["name"]: m["desiredReplicas"] for m in llmd_status(kmock)["models"]}
        assert desired == {"chat": 4, "code": 1}
        assert live(kmock, MODELS)["team-chat"]["spec"]["replicas"] == 4
        assert llmd["spec"]["models"][0]["replicas"] == 2
        # A spec change while autoscaling is on leaves KEDA's count alone.
        models_spec = llmd["spec"]["models"]
        models_spec[0]["replicas"] = 3
        await patch(kmock, llmd_path("team"), {"spec": {"models": models_spec}})
        await eventually(lambda: observed_current(kmock), what="a pass after the change")
        assert live(kmock, MODELS)["team-chat"]["spec"]["replicas"] == 4
        assert serve_count(kmock, "chat") == 4


def llmd_status(api: KubeAPI) -> dict[str, Any]:
    status: dict[str, Any] = live(api, "llmops.dev/v1alpha1/llmdeployments")["team"].get(
        "status", {}
    )
    return status


def observed_current(api: KubeAPI) -> bool:
    llmd = live(api, "llmops.dev/v1alpha1/llmdeployments")["team"]
    return bool(llmd.get("status", {}).get("observedGeneration") == llmd["metadata"]["generation"])


async def test_one_model_scales_to_zero_and_back_while_the_other_stays(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock) as operator:
        await started(kmock)
        await put_scale(kmock, "team-code", 1)
        await eventually(lambda: serve_count(kmock, "code") == 1, what="code at 1")
        chat_entry, chat_group = serve_entries(kmock)["llm-chat"], groups(kmock)["chat"]
        await put_scale(kmock, "team-code", 0)
        await eventually(lambda: serve_count(kmock, "code") == 0, what="code at 0")
        zero = serve_entries(kmock)["llm-code"]["autoscaling_config"]
        assert (zero["min_replicas"], zero["initial_replicas"]) == (0, 0)
        code = groups(kmock)["code"]
        assert (code["replicas"], code["minReplicas"]) == (0, 0)  # no worker of it is kept
        # A model at zero on purpose is not "below desired" (LLMOpsReplicasBelowDesired).
        sample = operator.metrics.registry.get_sample_value
        owned = {"namespace": NAMESPACE, "deployment": "team"}
        await eventually(
            lambda: sample("llmops_operator_desired_replicas", owned) == 0, what="desired 0"
        )
        at_zero = {**owned, "model": "code", "state": "desired"}
        assert sample("llmops_operator_model_replicas", at_zero) == 0
        assert sample("llmops_operator_model_replicas", {**at_zero, "model": "chat"}) == 2
        await put_scale(kmock, "team-code", 1)
        await eventually(lambda: serve_count(kmock, "code") == 1, what="code back at 1")
        assert serve_entries(kmock)["llm-chat"] == chat_entry
        assert groups(kmock)["chat"] == chat_group


async def test_a_per_model_bounds_change_reaches_the_running_worker_group(
    kmock: KubeAPI,
) -> None:
    """KubeRay's cluster hash leaves worker bounds out (ray-operator/controllers/ray/utils/
    util.go): the operator patches them on the active RayCluster, per model."""
    kmock.install_crds()
    async with running_operator(kmock):
        await started(kmock)
        cluster = await report_children_ready(kmock, "team", None, ["llm-chat", "llm-code"])
        await kuberay_starts_pods(kmock, cluster, "chat", ready=2)
        llmd = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["team"]
        models_spec = llmd["spec"]["models"]
        models_spec[1]["autoscaling"]["maxReplicas"] = 5
        await patch(kmock, llmd_path("team"), {"spec": {"models": models_spec}})
        await eventually(
            lambda: (
                groups(kmock, live(kmock, "ray.io/v1/rayclusters")[cluster])["code"]["maxReplicas"]
                == 5
            ),
            what="the live worker group's maxReplicas",
        )
        live_groups = groups(kmock, live(kmock, "ray.io/v1/rayclusters")[cluster])
        assert live_groups["chat"]["maxReplicas"] == 6
        assert live(kmock, SCALED_OBJECTS)["team-code"]["spec"]["maxReplicaCount"] == 5
        assert live(kmock, SCALED_OBJECTS)["team-chat"]["spec"]["maxReplicaCount"] == 6
        # The LLMModel reports its ready workers and their selector through /scale.
        await eventually(
            lambda: live(kmock, MODELS)["team-chat"].get("status", {}).get("replicas") == 2,
            what="team-chat's ready replicas",
        )
        async with kmock.get(model_path("team-chat") + "/scale") as response:
            scale = await response.json()
        assert scale["status"] == {
            "replicas": 2,
            "selector": "llmops.dev/deployment=team,ray.io/node-type=worker,ray.io/group=chat",
        }


async def test_autoscaling_off_writes_the_spec_count_through_on_change_only(
    kmock: KubeAPI,
) -> None:
    kmock.install_crds()
    manifest = example("per-model-scaling")
    manifest["spec"]["autoscaling"]["enabled"] = False
    async with running_operator(kmock):
        await create(kmock, manifest)
        await eventually(lambda: len(live(kmock, MODELS)) == 2, what="two LLMModels")
        assert not live(kmock, SCALED_OBJECTS)
        # `kubectl scale` holds while the spec's count does not change.
        await patch(kmock, model_path("team-chat") + "/scale", {"spec": {"replicas": 5}})
        await eventually(lambda: serve_count(kmock, "chat") == 5, what="chat at 5")
        models_spec = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["team"]["spec"]["models"]
        models_spec[0]["replicas"] = 3
        await patch(kmock, llmd_path("team"), {"spec": {"models": models_spec}})
        await eventually(
            lambda: live(kmock, MODELS)["team-chat"]["spec"]["replicas"] == 3,
            what="the new spec count written through",
        )
        await eventually(lambda: serve_count(kmock, "chat") == 3, what="chat at 3")
        assert live(kmock, MODELS)["team-code"]["spec"]["replicas"] == 0


async def test_the_single_scaled_object_and_a_removed_models_objects_are_deleted(
    kmock: KubeAPI,
) -> None:
    kmock.install_crds()
    # A cluster upgraded from the single ScaledObject of the whole deployment.
    old = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": "team",
            "namespace": NAMESPACE,
            "labels": {
                "llmops.dev/deployment": "team",
                "app.kubernetes.io/managed-by": "llmops-operator",
            },
        },
        "spec": {"scaleTargetRef": {"name": "team", "kind": "LLMDeployment"}, "triggers": []},
    }
    url = f"/apis/keda.sh/v1alpha1/namespaces/{NAMESPACE}/scaledobjects"
    async with kmock.post(url, json=old) as response:
        assert response.status < 300, await response.text()
    async with running_operator(kmock):
        await started(kmock)
        await eventually(lambda: "team" not in live(kmock, SCALED_OBJECTS), what="old one gone")
        llmd = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["team"]
        await patch(kmock, llmd_path("team"), {"spec": {"models": llmd["spec"]["models"][:1]}})
        await eventually(lambda: set(live(kmock, MODELS)) == {"team-chat"}, what="code pruned")
        await eventually(
            lambda: set(live(kmock, SCALED_OBJECTS)) == {"team-chat"}, what="its ScaledObject"
        )


async def test_a_model_object_name_too_long_is_ready_false_name_too_long(kmock: KubeAPI) -> None:
    kmock.install_crds()
    manifest = example("per-model-scaling")
    manifest["metadata"]["name"] = "a" * 47
    manifest["spec"]["models"][0]["name"] = "chat-model-with-a-long-name"
    async with running_operator(kmock):
        await create(kmock, manifest)

        def ready() -> dict[str, Any] | None:
            llmd = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["a" * 47]
            conditions = llmd.get("status", {}).get("conditions", [])
            return next((c for c in conditions if c["type"] == "Ready"), None)

        condition = await eventually(ready, what="Ready condition")
        assert condition["status"] == "False"
        assert condition["reason"] == "NameTooLong"
        assert "over 63" in condition["message"]
        assert not live(kmock, MODELS)

"""The real Kopf operator against a KMock API server: create, update, scale, delete, restart."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
import yaml

from llmops_operator.kube import USER_AGENT, KubeClient
from llmops_operator.render import cluster_hash
from tests.fakes.kube_api import APPLY_PATCH, KubeAPI, content_type
from tests.integration.operator_fixtures import (
    DISCOVERY_NEEDS,
    NAMESPACE,
    NEEDED_ELSEWHERE,
    OPERATOR_NEEDS,
    create,
    create_secret,
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
from tests.schemas import assert_valid

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(120)]

CHILD_RESOURCES = {
    "PersistentVolumeClaim": "v1/persistentvolumeclaims",
    "Job": "batch/v1/jobs",
    "RayService": "ray.io/v1/rayservices",
    "Service": "v1/services",
    "ScaledObject": "keda.sh/v1alpha1/scaledobjects",
    "PodMonitor": "monitoring.coreos.com/v1/podmonitors",
    "NetworkPolicy": "networking.k8s.io/v1/networkpolicies",
    "LLMModel": "llmops.dev/v1alpha1/llmmodels",
}
SCALED = "llama-8b-llama-3.1-8b-instruct"  # the model's LLMModel and ScaledObject


def shared(name: str) -> dict[str, Any]:
    """An example with a shared cache (ReadWriteMany): a PVC and a loader Job among its
    children, the kinds CHILD_RESOURCES lists (a per-pod cache has neither)."""
    manifest = example(name)
    manifest["spec"].setdefault("cache", {})["accessMode"] = "ReadWriteMany"
    return manifest


def children(api: KubeAPI) -> dict[str, dict[str, dict[str, Any]]]:
    return {kind: live(api, resource) for kind, resource in CHILD_RESOURCES.items()}


def model_path(name: str) -> str:
    return f"/apis/llmops.dev/v1alpha1/namespaces/{NAMESPACE}/llmmodels/{name}"


def llmd(api: KubeAPI, name: str) -> dict[str, Any]:
    return live(api, "llmops.dev/v1alpha1/llmdeployments")[name]


def event_messages(api: KubeAPI) -> str:
    return " | ".join(e.get("message", "") for e in live(api, "v1/events").values())


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_)


def serve_config(api: KubeAPI, name: str) -> dict[str, Any]:
    rayservice = live(api, "ray.io/v1/rayservices")[name]
    config: dict[str, Any] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config


async def test_apply_creates_valid_children_with_owner_references(kmock: KubeAPI) -> None:
    kmock.install_crds()
    await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_test"})
    async with running_operator(kmock):
        created = await create(kmock, shared("llama-8b-gpu"))
        uid = created["metadata"]["uid"]
        await eventually(lambda: all(children(kmock).values()), what="all eight children")
        found = children(kmock)
        objects = [obj for by_name in found.values() for obj in by_name.values()]
        assert len(objects) == 8
        for obj in objects:
            owners = obj["metadata"]["ownerReferences"]
            assert owners == [
                {
                    "apiVersion": "llmops.dev/v1alpha1",
                    "kind": "LLMDeployment",
                    "name": "llama-8b",
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
            assert obj["metadata"]["labels"]["llmops.dev/deployment"] == "llama-8b"
        assert_valid(objects)
        status = await eventually(
            lambda: (
                llmd(kmock, "llama-8b")["status"].get("conditions")
                and llmd(kmock, "llama-8b")["status"]
            ),
            what="status",
        )
        assert status["ready"] == "False"
        assert condition(llmd(kmock, "llama-8b"), "ModelCached")["reason"] == "Loading"
        assert status["endpoints"]["http"] == f"http://llama-8b.{NAMESPACE}.svc:8000"
        assert status["selector"] == (
            "llmops.dev/deployment=llama-8b,ray.io/node-type=worker,"
            "ray.io/group=llama-3.1-8b-instruct"
        )
        # Kubernetes Events for kubectl describe: one for everything a pass created.
        created_event = await eventually(
            lambda: next(
                e for e in live(kmock, "v1/events").values() if e.get("reason") == "Created"
            ),
            what="a Created Event",
        )
        assert created_event["message"].startswith("created ")
        for kind in CHILD_RESOURCES:
            assert f"{kind}/" in created_event["message"]


async def test_status_follows_children_to_ready(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(
        kmock, converge_interval_s=0.5, converge_max_interval_s=60
    ) as operator:
        await create(kmock, shared("llama-8b-gpu"))
        await eventually(lambda: all(children(kmock).values()), what="children")
        # Passes that change nothing back off (0.5, 1, 2, 4, 8 s: none is due from about 8 s to
        # 16 s after creation); the children's watch events must bring the next pass forward.
        await asyncio.sleep(10)
        job_name = next(iter(children(kmock)["Job"]))
        cluster = await kuberay_creates_cluster(kmock, "llama-8b")
        await kuberay_starts_pods(kmock, cluster, "llama-3.1-8b-instruct", ready=1, not_ready=1)
        await report_children_ready(
            kmock, "llama-8b", job_name, ["llm-llama-3-1-8b-instruct"], cluster=cluster
        )
        await eventually(
            lambda: llmd(kmock, "llama-8b")["status"]["ready"] == "True",
            within=3,
            what="Ready soon after the children reported",
        )
        status = llmd(kmock, "llama-8b")["status"]
        assert status["replicas"] == 1
        labels = {"namespace": NAMESPACE, "deployment": "llama-8b"}
        for gauge in ("llmops_operator_desired_replicas", "llmops_operator_ready_replicas"):
            assert operator.metrics.registry.get_sample_value(gauge, labels) == 1
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "ModelCached": "True",
            "ServingReady": "True",
            "AutoscalingReady": "True",
            "Ready": "True",
        }
        assert status["models"] == [
            {
                "name": "llama-3.1-8b-instruct",
                "state": "Ready",
                "message": "",
                "replicas": 1,
                "readyReplicas": 1,
                "desiredReplicas": 1,
            }
        ]
        assert status["replicasSummary"] == "llama-3.1-8b-instruct 1/1"
        model = {**labels, "model": "llama-3.1-8b-instruct"}
        for state in ("desired", "ready"):
            value = operator.metrics.registry.get_sample_value(
                "llmops_operator_model_replicas", {**model, "state": state}
            )
            assert value == 1
        # The LLMModel's status is what its /scale reports to the HPA.
        llm_model = live(kmock, "llmops.dev/v1alpha1/llmmodels")[SCALED]
        assert llm_model["status"] == {
            "replicas": 1,
            "selector": status["selector"],
        }


async def test_spec_update_patches_children(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock):
        await create(kmock, shared("llama-8b-gpu"))
        await eventually(lambda: all(children(kmock).values()), what="children")
        before = children(kmock)
        # The API server resizes only a Bound claim (ValidatePersistentVolumeClaimUpdate).
        size = before["PersistentVolumeClaim"]["llama-8b-model-cache"]["spec"]["resources"]
        bound = {"phase": "Bound", "capacity": {"storage": size["requests"]["storage"]}}
        pvc = f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims/llama-8b-model-cache"
        await patch(kmock, f"{pvc}/status", {"status": bound})
        await patch(
            kmock,
            llmd_path("llama-8b"),
            {"spec": {"autoscaling": {"maxReplicas": 6}, "cache": {"size": "80Gi"}}},
        )
        await eventually(
            lambda: (
                live(kmock, "keda.sh/v1alpha1/scaledobjects")[SCALED]["spec"]["maxReplicaCount"]
                == 6
            ),
            what="ScaledObject maxReplicaCount 6",
        )
        await eventually(
            lambda: (
                live(kmock, "v1/persistentvolumeclaims")["llama-8b-model-cache"]["spec"][
                    "resources"
                ]["requests"]["storage"]
                == "80Gi"
            ),
            what="PVC resized",
        )
        after = children(kmock)
        # Patched in place: the same objects (uids), each at a new resourceVersion.
        for kind, name in (
            ("PersistentVolumeClaim", "llama-8b-model-cache"),
            ("ScaledObject", SCALED),
        ):
            old, new = before[kind][name]["metadata"], after[kind][name]["metadata"]
            assert new["uid"] == old["uid"], kind
            assert new["resourceVersion"] != old["resourceVersion"], kind
        assert_valid(live(kmock, "keda.sh/v1alpha1/scaledobjects").values())


async def test_scale_subresource_reaches_serve_replicas_without_new_cluster(
    kmock: KubeAPI,
) -> None:
    kmock.install_crds()
    async with running_operator(kmock):
        await create(kmock, shared("llama-8b-gpu"))
        before = await eventually(
            lambda: live(kmock, "ray.io/v1/rayservices").get("llama-8b"), what="RayService"
        )
        # What KEDA's HPA does: write the model's LLMModel through its scale subresource.
        await eventually(
            lambda: live(kmock, "llmops.dev/v1alpha1/llmmodels").get(SCALED), what="LLMModel"
        )
        await patch(kmock, model_path(SCALED) + "/scale", {"spec": {"replicas": 3}})

        def replicas() -> int:
            config = serve_config(kmock, "llama-8b")["applications"][0]
            return next(
                d["autoscaling_config"]["min_replicas"]
                for d in config["deployments"]
                if d["name"].startswith("llm-")
            )

        await eventually(lambda: replicas() == 3, what="Serve replicas 3")
        after = live(kmock, "ray.io/v1/rayservices")["llama-8b"]
        # Only the Serve override and the worker group's count changed, which KubeRay's
        # cluster hash leaves out: same cluster, same app args (no restart).
        old_cluster = before["spec"]["rayClusterConfig"]
        new_cluster = after["spec"]["rayClusterConfig"]
        assert cluster_hash(old_cluster) == cluster_hash(new_cluster)
        assert [g["replicas"] for g in new_cluster["workerGroupSpecs"]] == [3]
        old_app = yaml.safe_load(before["spec"]["serveConfigV2"])["applications"][0]
        new_app = yaml.safe_load(after["spec"]["serveConfigV2"])["applications"][0]
        assert new_app["args"] == old_app["args"]
        assert after["metadata"]["uid"] == before["metadata"]["uid"]


async def test_worker_limit_does_not_queue_objects_behind_idle_workers(kmock: KubeAPI) -> None:
    # One reconcile slot, six objects: a slot is held for a pass, not while an object's event
    # worker idles (Kopf's own worker limit keeps a slot 5 s after the last event of each).
    kmock.install_crds()
    names = [f"tiny-{i}" for i in range(6)]
    for name in names:
        manifest = example("tiny-cpu")
        manifest["metadata"]["name"] = name
        await create(kmock, manifest)
    async with running_operator(kmock, worker_limit=1):
        await eventually(
            lambda: set(live(kmock, "ray.io/v1/rayservices")) >= set(names),
            within=25,  # about 8 s here; 6 x 5 s with slots held by idle workers
            what="a RayService for every object",
        )


async def test_delete_removes_every_child(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock):
        await create(kmock, shared("semantic-routing"))
        await eventually(lambda: all(children(kmock).values()), what="children")
        async with kmock.delete(llmd_path("assistants")) as response:
            assert response.status == 200
        await eventually(
            lambda: not any(children(kmock).values()), what="children garbage-collected"
        )
        assert "assistants" not in live(kmock, "llmops.dev/v1alpha1/llmdeployments")


class SlowReadsAPI(KubeAPI):
    """Answers reads of PodMonitors after ``delay`` seconds: passes are caught mid-flight."""

    delay = 0.0

    async def _serve_fetch(self, request: Any) -> Any:
        if self.delay and request.resource is not None and request.resource.plural == "podmonitors":
            await asyncio.sleep(self.delay)
        return await super()._serve_fetch(request)


@pytest.mark.kmock(cls=SlowReadsAPI)
async def test_delete_during_a_pass_is_finalized_promptly(kmock: SlowReadsAPI) -> None:
    # Kopf keeps the finalizer until the object's timers exit; one caught mid-pass used to be
    # re-checked only after 60 s, so `kubectl delete` hung for a minute.
    kmock.install_crds()
    async with running_operator(kmock, converge_interval_s=0.5):
        await create(kmock, shared("llama-8b-gpu"))
        await eventually(lambda: all(children(kmock).values()), what="children")
        kmock.delay = 3.0
        await asyncio.sleep(1.5)  # a converge pass is now waiting on its PodMonitor read
        async with kmock.delete(llmd_path("llama-8b")) as response:
            assert response.status == 200
        await eventually(
            lambda: "llama-8b" not in live(kmock, "llmops.dev/v1alpha1/llmdeployments"),
            within=15,
            what="the finalizer released",
        )


class GatedAppliesAPI(KubeAPI):
    """Holds applies of RayServices until ``gate`` opens: a pass stops half-way."""

    gate: asyncio.Event | None = None
    held = 0

    async def _server_side_apply(self, request: Any) -> Any:
        if self.gate is not None and request.resource.plural == "rayservices":
            self.held += 1
            await self.gate.wait()
        return await super()._server_side_apply(request)


@pytest.mark.kmock(cls=GatedAppliesAPI)
async def test_restart_mid_reconcile_converges_without_duplicates(kmock: GatedAppliesAPI) -> None:
    kmock.install_crds()
    kmock.gate = asyncio.Event()
    async with running_operator(kmock) as operator:
        await create(kmock, shared("llama-70b-tp"))
        # The first pass applied the cache children and now waits on the RayService.
        await eventually(lambda: kmock.held, what="a pass applying the RayService")
        await operator.stop()
        before = children(kmock)
        missing = [kind for kind, objs in before.items() if not objs]
        assert "RayService" in missing, "the operator stopped after every child existed"
        assert before["PersistentVolumeClaim"], "the operator stopped before any child existed"
        # The request the stopped operator sent still lands, as on a real API server.
        kmock.gate.set()
        kmock.gate = None
        operator.start()
        await eventually(lambda: all(children(kmock).values()), what="convergence after restart")
        after = children(kmock)
    assert {kind: len(objs) for kind, objs in after.items()} == dict.fromkeys(CHILD_RESOURCES, 1)
    for kind, objs in before.items():  # what existed was kept, not replaced
        for name, obj in objs.items():
            assert after[kind][name]["metadata"]["uid"] == obj["metadata"]["uid"], kind


async def test_invalid_spec_is_reported_and_creates_nothing(kmock: KubeAPI) -> None:
    kmock.install_crds()
    manifest = shared("semantic-routing")
    for model in manifest["spec"]["models"]:
        # Semantic routing without examples: the CRD's CEL rule refuses it on a real API
        # server; the operator must still report it when it gets one (older CRD, no CEL).
        model["routeExamples"] = []
    kmock.cel_rules = False
    async with running_operator(kmock):
        await create(kmock, manifest)
        await eventually(
            lambda: condition(llmd(kmock, "assistants"), "Ready")["reason"] == "InvalidSpec",
            what="Ready=False InvalidSpec",
        )
        ready = condition(llmd(kmock, "assistants"), "Ready")
        assert ready["status"] == "False"
        assert "routeExamples" in ready["message"]
        await eventually(lambda: "invalid spec" in event_messages(kmock), what="an Event")
        assert not any(children(kmock).values())
        # Fixing the spec converges.
        fixed = example("semantic-routing")["spec"]["models"]
        await patch(kmock, llmd_path("assistants"), {"spec": {"models": fixed}})
        await eventually(lambda: all(children(kmock).values()), what="children after the fix")


async def test_missing_prerequisites_are_conditions_not_crashes(kmock: KubeAPI) -> None:
    async with running_operator(kmock):
        await create(kmock, example("tiny-cpu"))
        await eventually(
            lambda: condition(llmd(kmock, "tiny"), "Ready")["reason"] == "KubeRayMissing",
            what="KubeRayMissing",
        )
        assert "install the KubeRay operator" in condition(llmd(kmock, "tiny"), "Ready")["message"]
        assert not any(children(kmock).values())
        # KubeRay installed, KEDA still missing: serving proceeds, autoscaling says why not.
        kmock.install_crds("rayservices.ray.io")
        manifest_autoscaled = {"spec": {"autoscaling": {"enabled": True}}}
        await patch(kmock, llmd_path("tiny"), manifest_autoscaled)
        await eventually(lambda: live(kmock, "ray.io/v1/rayservices"), what="RayService")
        await eventually(
            lambda: condition(llmd(kmock, "tiny"), "AutoscalingReady")["reason"] == "KEDAMissing",
            what="KEDAMissing",
        )
        assert not live(kmock, "keda.sh/v1alpha1/scaledobjects")
        assert not live(kmock, "monitoring.coreos.com/v1/podmonitors")
        # The status the operator wrote is what the CRD's status schema accepts.
        assert_valid([llmd(kmock, "tiny")])


async def test_discovery_caches_presence_but_rechecks_absence(kmock: KubeAPI) -> None:
    client = KubeClient(kopf.ConnectionInfo(server=str(kmock.url), insecure=True))
    try:
        assert not await client.api_installed("ray.io/v1", "rayservices")
        kmock.install_crds("rayservices.ray.io")
        assert await client.api_installed("ray.io/v1", "rayservices")  # absence not cached
        asked = client.calls["GET"]
        assert await client.api_installed("ray.io/v1", "rayservices")
        assert client.calls["GET"] == asked  # presence answered from the cache
        assert not await client.api_installed("keda.sh/v1alpha1", "scaledobjects")
    finally:
        await client.close()


VERBS = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "DELETE": "delete"}


def used_verbs(api: KubeAPI) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource[/subresource]) -> RBAC verbs of the operator's requests (its own
    client's and Kopf's, told from the test's by their User-Agent)."""
    used: dict[tuple[str, str], set[str]] = {}
    for request in api:
        agent = request.headers.get("User-Agent", "")
        if not agent.startswith((USER_AGENT, "kopf/")):
            continue
        if request.resource is None or request.action is None or not request.resource.plural:
            continue  # discovery (/api, /apis/...): allowed to every authenticated user
        verbs = {VERBS.get(request.action.name)}
        if request.action.name == "UPDATE":
            verbs = {"update" if request.method.name == "PUT" else "patch"}
            if content_type(request).startswith(APPLY_PATCH):
                # An apply creates the object when absent: the API server then authorizes
                # "create" as well as "patch".
                verbs.add("create")
        resource = request.resource.plural + (
            f"/{request.subresource}" if request.subresource else ""
        )
        used.setdefault((request.resource.group or "", resource), set()).update(map(str, verbs))
    return used


async def test_rbac_grants_exactly_the_verbs_the_operator_uses(kmock: KubeAPI) -> None:
    # A whole life: create, children ready, scale, spec and model changes, autoscaling off,
    # an invalid spec, delete. What the chart grants (OPERATOR_NEEDS and DISCOVERY_NEEDS;
    # test_chart.py checks the rendered Roles) must be what this traffic used, plus the
    # verbs NEEDED_ELSEWHERE says why it keeps.
    kmock.install_crds()
    async with running_operator(kmock, converge_interval_s=0.5):
        await create(kmock, shared("llama-8b-gpu"))
        await eventually(lambda: all(children(kmock).values()), what="children")
        job = next(iter(children(kmock)["Job"]))
        await report_children_ready(kmock, "llama-8b", job, ["llm-llama-3-1-8b-instruct"])
        await eventually(lambda: llmd(kmock, "llama-8b")["status"]["ready"] == "True")
        await patch(kmock, model_path(SCALED) + "/scale", {"spec": {"replicas": 2}})
        await patch(kmock, llmd_path("llama-8b"), {"spec": {"autoscaling": {"maxReplicas": 3}}})
        await eventually(
            lambda: (
                live(kmock, "keda.sh/v1alpha1/scaledobjects")[SCALED]["spec"]["maxReplicaCount"]
                == 3
            ),
            what="the ScaledObject patched",
        )
        old_job = job
        models = llmd(kmock, "llama-8b")["spec"]["models"]
        models[0]["source"] = "hf://meta-llama/Llama-3.2-1B-Instruct"  # a new cache: new Job
        await patch(kmock, llmd_path("llama-8b"), {"spec": {"models": models}})
        await eventually(
            lambda: old_job not in live(kmock, "batch/v1/jobs") and live(kmock, "batch/v1/jobs"),
            what="the old loader Job replaced",
        )
        await patch(kmock, llmd_path("llama-8b"), {"spec": {"autoscaling": {"enabled": False}}})
        await eventually(
            lambda: not live(kmock, "keda.sh/v1alpha1/scaledobjects"), what="ScaledObject pruned"
        )
        invalid = example("semantic-routing")
        for model in invalid["spec"]["models"]:
            model["routeExamples"] = []
        kmock.cel_rules = False  # an older CRD: the CEL rule would refuse it
        await create(kmock, invalid)
        await eventually(lambda: "invalid spec" in event_messages(kmock), what="invalid")
        async with kmock.delete(llmd_path("llama-8b")) as response:
            assert response.status == 200
        await eventually(lambda: not any(children(kmock).values()), what="cleanup")
    used = used_verbs(kmock)
    granted = {**OPERATOR_NEEDS, **DISCOVERY_NEEDS}
    beyond = {key: verbs - granted.get(key, set()) for key, verbs in used.items()}
    assert {k: v for k, v in beyond.items() if v} == {}, "used but not granted"
    unused = {key: verbs - used.get(key, set()) for key, verbs in granted.items()}
    unused = {k: v for k, v in unused.items() if v}
    explained = {key: verbs for key, (verbs, _why) in NEEDED_ELSEWHERE.items()}
    assert unused == explained, "granted but unused: drop the grant or say why it is needed"

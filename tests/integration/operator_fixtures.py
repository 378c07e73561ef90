"""Runs the real Kopf operator in-process against the extended KMock API server."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from llmops_operator.main import operate
from llmops_operator.metrics import OperatorMetrics
from llmops_operator.settings import OperatorSettings
from tests.fakes.kube_api import KubeAPI

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"
NAMESPACE = "llmops-demo"


def example(name: str) -> dict[str, Any]:
    """A manifest from deploy/examples."""
    return copy.deepcopy(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))


def test_settings(**overrides: Any) -> OperatorSettings:
    """Operator settings for tests: fast convergence, no ports, no peering."""
    values: dict[str, Any] = {
        "standalone": True,
        "converge_interval_s": 0.5,
        "resync_interval_s": 10.0,
        "metrics_port": 0,
        "health_port": 0,
        **overrides,
    }
    return OperatorSettings(**values)


class RunningOperator:
    """One operator task; `stop()` ends it the way SIGTERM does."""

    def __init__(self, api: KubeAPI, settings: OperatorSettings) -> None:
        self.api = api
        self.settings = settings
        self.metrics = OperatorMetrics.create()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        server = str(self.api.url)

        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=server, insecure=True)

        self._stop = asyncio.Event()
        self._task = asyncio.create_task(
            operate(self.settings, login=login, stop_flag=self._stop, metrics=self.metrics)
        )

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=15)
            self._task = None


@contextlib.asynccontextmanager
async def running_operator(api: KubeAPI, **overrides: Any) -> AsyncIterator[RunningOperator]:
    """Starts the operator; stops it afterwards."""
    operator = RunningOperator(api, test_settings(**overrides))
    operator.start()
    try:
        yield operator
    finally:
        await operator.stop()


async def eventually(
    check: Callable[[], Any], within: float = 20.0, what: str = "condition"
) -> Any:
    """Polls ``check`` until it returns something truthy; fails with ``what`` on timeout."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (KeyError, TypeError, IndexError, StopIteration):
            last = None
        if last:
            return last
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out after {within} s waiting for {what}")


def live(
    api: KubeAPI, resource: str, namespace: str | None = NAMESPACE
) -> dict[str, dict[str, Any]]:
    """Objects of one resource that exist now, by name."""
    return api.alive(resource, namespace)


async def create(api: KubeAPI, manifest: dict[str, Any]) -> dict[str, Any]:
    """POSTs an LLMDeployment like `kubectl apply` does for a new object."""
    ns = manifest["metadata"].get("namespace", NAMESPACE)
    url = f"/apis/llmops.dev/v1alpha1/namespaces/{ns}/llmdeployments"
    async with api.post(url, json=manifest) as response:
        assert response.status < 300, await response.text()
        created: dict[str, Any] = await response.json()
        return created


async def patch(api: KubeAPI, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Merge-patches an object (path relative to the API root)."""
    headers = {"Content-Type": "application/merge-patch+json"}
    async with api.patch(path, json=body, headers=headers) as response:
        assert response.status < 300, await response.text()
        patched: dict[str, Any] = await response.json()
        return patched


def llmd_path(name: str, namespace: str = NAMESPACE) -> str:
    """API path of an LLMDeployment."""
    return f"/apis/llmops.dev/v1alpha1/namespaces/{namespace}/llmdeployments/{name}"


async def create_secret(
    api: KubeAPI, name: str, data: dict[str, str], namespace: str = NAMESPACE
) -> dict[str, Any]:
    """A Secret as `kubectl create secret generic NAME --from-literal=...` makes it."""
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": data,
    }
    async with api.post(f"/api/v1/namespaces/{namespace}/secrets", json=body) as response:
        assert response.status < 300, await response.text()
        created: dict[str, Any] = await response.json()
        return created


# k8s.io/apimachinery/pkg/util/rand: the characters KubeRay's random name suffixes use.
RAND_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"


async def kuberay_creates_cluster(api: KubeAPI, name: str, namespace: str = NAMESPACE) -> str:
    """What KubeRay >= 1.4 does for a RayService: a RayCluster named ``<rayservice>-<5 random
    chars>`` (ray-operator/controllers/ray/utils/util.go) from spec.rayClusterConfig, owned by
    the RayService. Returns its name."""
    rayservice = live(api, "ray.io/v1/rayservices", namespace)[name]
    cluster = f"{name}-{''.join(random.choices(RAND_ALPHANUMS, k=5))}"
    body = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": cluster,
            "namespace": namespace,
            "labels": {"ray.io/originated-from-crd": "RayService"},
            "ownerReferences": [
                {
                    "apiVersion": "ray.io/v1",
                    "kind": "RayService",
                    "name": name,
                    "uid": rayservice["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": copy.deepcopy(rayservice["spec"]["rayClusterConfig"]),
    }
    url = f"/apis/ray.io/v1/namespaces/{namespace}/rayclusters"
    async with api.post(url, json=body, params={"fieldManager": "ray-operator"}) as response:
        assert response.status < 300, await response.text()
    return cluster


async def kuberay_starts_pods(
    api: KubeAPI,
    cluster: str,
    group: str,
    ready: int,
    not_ready: int = 0,
    namespace: str = NAMESPACE,
) -> None:
    """Worker pods of one group as KubeRay labels them (ray-operator/controllers/ray/utils/
    constant.go: ray.io/cluster, ray.io/node-type, ray.io/group) and the kubelet reports them
    (condition Ready)."""
    url = f"/api/v1/namespaces/{namespace}/pods"
    for index in range(ready + not_ready):
        suffix = "".join(random.choices(RAND_ALPHANUMS, k=5))
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{cluster}-{group.replace('.', '-')}-worker-{suffix}",
                "namespace": namespace,
                "labels": {
                    "ray.io/cluster": cluster,
                    "ray.io/node-type": "worker",
                    "ray.io/group": group,
                    "ray.io/serve": "true",
                },
            },
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": str(index < ready)}],
            },
        }
        async with api.post(url, json=pod) as response:
            assert response.status < 300, await response.text()


async def report_children_ready(
    api: KubeAPI,
    name: str,
    job: str | None,
    llm_deployments: list[str],
    namespace: str = NAMESPACE,
    cluster: str | None = None,
) -> str:
    """Writes the status the Job controller, KubeRay and KEDA report once all is up; KubeRay
    first creates the RayCluster (unless ``cluster`` names one) and reports it active.
    Returns the active RayCluster's name."""
    ns = f"namespaces/{namespace}"
    if job is not None:
        await patch(
            api,
            f"/apis/batch/v1/{ns}/jobs/{job}/status",
            {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
        )
    cluster = cluster or await kuberay_creates_cluster(api, name, namespace)
    deployments = {d: {"status": "HEALTHY"} for d in [*llm_deployments, "router"]}
    app = {"status": "RUNNING", "serveDeploymentStatuses": deployments}
    await patch(
        api,
        f"/apis/ray.io/v1/{ns}/rayservices/{name}/status",
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "activeServiceStatus": {
                    "rayClusterName": cluster,
                    "applicationStatuses": {"llmops": app},
                },
            }
        },
    )
    llmd = live(api, "llmops.dev/v1alpha1/llmdeployments", namespace)[name]
    if (llmd["spec"].get("autoscaling") or {}).get("enabled", True):
        # A pass applies each model's ScaledObject after the RayService: report once it exists.
        for model in llmd["spec"]["models"]:
            scaled = f"{name}-{model['name']}"
            await eventually(
                lambda scaled=scaled: live(api, "keda.sh/v1alpha1/scaledobjects", namespace).get(
                    scaled
                ),
                what=f"the ScaledObject {scaled}",
            )
            ready = {"type": "Ready", "status": "True", "reason": "ScaledObjectReady"}
            await patch(
                api,
                f"/apis/keda.sh/v1alpha1/{ns}/scaledobjects/{scaled}/status",
                {"status": {"conditions": [ready]}},
            )
    return cluster


# What the operator does in each namespace it serves: (apiGroup, resource) -> verbs. The RBAC
# test (test_operator.py) checks this against the operator's own traffic; the chart test checks
# the rendered Roles grant it.
OPERATOR_NEEDS = {
    ("llmops.dev", "llmdeployments"): {"get", "list", "watch", "patch"},
    ("llmops.dev", "llmdeployments/status"): {"patch"},
    ("llmops.dev", "llmdeployments/finalizers"): {"update"},
    ("llmops.dev", "llmmodels"): {"list", "watch", "create", "patch", "delete"},
    ("llmops.dev", "llmmodels/status"): {"patch"},
    ("ray.io", "rayservices"): {"list", "watch", "create", "patch"},
    ("ray.io", "rayclusters"): {"get", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "secrets"): {"get"},
    ("keda.sh", "scaledobjects"): {"list", "watch", "create", "patch", "delete"},
    ("batch", "jobs"): {"list", "watch", "create", "patch", "delete"},
    ("monitoring.coreos.com", "podmonitors"): {"create", "patch"},
    ("", "persistentvolumeclaims"): {"get", "create", "patch"},
    ("", "services"): {"create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"create", "patch"},
    ("", "events"): {"create"},
}
DISCOVERY_NEEDS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}
# Granted, but not exercised by the RBAC test's flow, each for a reason.
NEEDED_ELSEWHERE = {
    ("llmops.dev", "llmmodels"): (
        {"delete"},
        "a removed model's LLMModel is pruned (test_operator_models.py)",
    ),
    ("", "namespaces"): ({"list", "watch"}, "Kopf watches namespaces for glob patterns"),
    ("llmops.dev", "llmdeployments/finalizers"): (
        {"update"},
        "OwnerReferencesPermissionEnforcement checks it for blockOwnerDeletion: true",
    ),
    ("ray.io", "rayclusters"): (
        {"delete"},
        "rollout Recreate deletes a stale active cluster (test_operator_recreate.py)",
    ),
}

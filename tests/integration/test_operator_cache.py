"""The shared model cache (ReadWriteMany): a volume that cannot bind, and loader Jobs."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from llmops_operator import reconcile
from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import (
    NAMESPACE,
    create,
    create_secret,
    eventually,
    example,
    live,
    patch,
    running_operator,
)

pytestmark = [pytest.mark.timeout(90)]

PVC = "llama-8b-model-cache"
PVC_PATH = f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims/{PVC}"


def shared_cache(name: str) -> dict[str, Any]:
    manifest = example(name)
    manifest["spec"].setdefault("cache", {})["accessMode"] = "ReadWriteMany"
    return manifest


def condition(api: KubeAPI, name: str, type_: str) -> dict[str, Any]:
    status = live(api, "llmops.dev/v1alpha1/llmdeployments")[name]["status"]
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_pending_for_counts_from_creation_and_only_while_pending() -> None:
    now = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
    pvc = {
        "metadata": {"creationTimestamp": "2026-01-01T11:57:30Z"},
        "status": {"phase": "Pending"},
    }
    assert reconcile.pending_for(pvc, now) == 150.0
    assert reconcile.pending_for({**pvc, "status": {"phase": "Bound"}}, now) is None
    assert reconcile.pending_for({**pvc, "status": {}}, now) is None
    assert reconcile.pending_for(None, now) is None


@pytest.mark.kmock(cls=KubeAPI)
async def test_a_cache_volume_left_pending_names_the_storage_class_problem(
    kmock: KubeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default StorageClasses of the big clouds offer ReadWriteOnce only, so a ReadWriteMany
    claim stays Pending; the condition must say so instead of "downloading"."""
    monkeypatch.setattr(reconcile, "PVC_PENDING_GRACE_S", 1.0)
    kmock.install_crds()
    await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_right"})
    async with running_operator(kmock, converge_max_interval_s=1.0):
        await create(kmock, shared_cache("llama-8b-gpu"))
        await eventually(lambda: live(kmock, "v1/persistentvolumeclaims").get(PVC), what="PVC")
        # What the PV controller reports while no provisioner can serve the claim.
        await patch(kmock, PVC_PATH + "/status", {"status": {"phase": "Pending"}})
        await eventually(
            lambda: condition(kmock, "llama-8b", "ModelCached")["reason"] == "CacheVolumePending",
            what="ModelCached=False CacheVolumePending",
        )
        cached = condition(kmock, "llama-8b", "ModelCached")
        assert cached["status"] == "False"
        assert "StorageClass" in cached["message"]
        assert "spec.cache.accessMode: ReadWriteOnce" in cached["message"]
        assert condition(kmock, "llama-8b", "Ready")["reason"] == "CacheVolumePending"
        # Once the volume binds, the loader's progress is what the condition reports.
        await patch(kmock, PVC_PATH + "/status", {"status": {"phase": "Bound"}})
        await eventually(
            lambda: condition(kmock, "llama-8b", "ModelCached")["reason"] == "Loading",
            what="ModelCached back to Loading",
        )


JOBS = "batch/v1/jobs"
SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/hf-token"


@pytest.mark.kmock(cls=KubeAPI)
async def test_a_changed_secret_replaces_a_failed_loader_job(kmock: KubeAPI) -> None:
    """A loader Job's pod template is immutable, so a fixed token needs a new Job: its name
    carries the credentials Secret's resourceVersion; the failed one is pruned."""
    kmock.install_crds()
    await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_wrong"})
    async with running_operator(kmock, converge_max_interval_s=1.0):
        await create(kmock, shared_cache("llama-8b-gpu"))
        first = next(iter(await eventually(lambda: live(kmock, JOBS), what="a loader Job")))
        failed = {"type": "Failed", "status": "True", "message": "401 from the hub"}
        job_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{first}/status"
        await patch(kmock, job_path, {"status": {"failed": 1, "conditions": [failed]}})
        await eventually(
            lambda: condition(kmock, "llama-8b", "ModelCached")["reason"] == "LoadFailed",
            what="ModelCached=False LoadFailed",
        )
        await patch(kmock, SECRET_PATH, {"stringData": {"HF_TOKEN": "hf_right"}})
        jobs = await eventually(
            lambda: set(live(kmock, JOBS)) - {first} and set(live(kmock, JOBS)) - {first},
            what="a new loader Job",
        )
        (second,) = jobs
        assert second.startswith("llama-8b-load-")
        await eventually(lambda: first not in live(kmock, JOBS), what="the failed Job pruned")
        await eventually(
            lambda: condition(kmock, "llama-8b", "ModelCached")["reason"] == "Loading",
            what="ModelCached follows the new Job",
        )


@pytest.mark.kmock(cls=KubeAPI)
async def test_a_missing_credentials_secret_is_a_condition(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock, converge_max_interval_s=1.0):
        await create(kmock, shared_cache("llama-8b-gpu"))  # names Secret hf-token
        await eventually(
            lambda: condition(kmock, "llama-8b", "Ready")["reason"] == "CredentialsMissing",
            what="Ready=False CredentialsMissing",
        )
        cached = condition(kmock, "llama-8b", "ModelCached")
        assert cached["status"] == "False"
        assert "hf-token" in cached["message"]
        assert live(kmock, JOBS)  # the children are still applied
        await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_right"})
        await eventually(
            lambda: condition(kmock, "llama-8b", "ModelCached")["reason"] == "Loading",
            what="Loading once the Secret exists",
        )


@pytest.mark.kmock(cls=KubeAPI)
async def test_a_pending_volume_is_resized_once_bound_and_never_blocks_a_pass(
    kmock: KubeAPI,
) -> None:
    """The API server refuses any change to a claim that is not Bound
    (pkg/apis/core/validation, ValidatePersistentVolumeClaimUpdate; the fake copies it): a
    larger cache waits for the claim to bind, and the rest of the pass still applies."""
    kmock.install_crds()
    async with running_operator(kmock, converge_interval_s=0.5):
        manifest = shared_cache("llama-8b-gpu")
        await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_test"})
        await create(kmock, manifest)
        await eventually(lambda: live(kmock, "v1/persistentvolumeclaims").get(PVC), what="PVC")
        path = f"/apis/llmops.dev/v1alpha1/namespaces/{NAMESPACE}/llmdeployments/llama-8b"
        change = {"autoscaling": {"maxReplicas": 6}, "cache": {"size": "80Gi"}}
        await patch(kmock, path, {"spec": change})

        def max_replicas() -> Any:
            return live(kmock, "keda.sh/v1alpha1/scaledobjects")["llama-8b-llama-3.1-8b-instruct"][
                "spec"
            ]["maxReplicaCount"]

        await eventually(lambda: max_replicas() == 6, what="the rest of the pass applied")

        def size() -> Any:
            return live(kmock, "v1/persistentvolumeclaims")[PVC]["spec"]["resources"]["requests"][
                "storage"
            ]

        assert size() == "40Gi"  # Pending: left as it is
        bound = {"phase": "Bound", "capacity": {"storage": "40Gi"}}
        await patch(kmock, f"{PVC_PATH}/status", {"status": bound})
        await eventually(lambda: size() == "80Gi", what="the bound claim resized")

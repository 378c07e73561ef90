"""Children written with server-side apply: removed fields go away, conflicts are reported.

The fake API server's apply follows the API server's field manager
(k8s.io/apimachinery/pkg/util/managedfields; lists atomic as in CRDs without list-type
markers); the first tests pin that behaviour, the others the operator's use of it.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest

from llmops_operator import reconcile
from llmops_operator.kube import FIELD_MANAGER, KubeClient, KubeError
from tests.fakes.kube_api import KubeAPI, managers
from tests.integration.operator_fixtures import (
    NAMESPACE,
    create,
    eventually,
    example,
    live,
    llmd_path,
    patch,
    running_operator,
)

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(60)]

RAYSERVICES = "ray.io/v1/rayservices"


@pytest.fixture
async def client(kmock: KubeAPI) -> AsyncIterator[KubeClient]:
    kmock.install_crds()
    client = KubeClient(kopf.ConnectionInfo(server=str(kmock.url), insecure=True))
    yield client
    await client.close()


def rayservice(**start_params: str) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "rs", "namespace": NAMESPACE, "labels": {"a": "1"}},
        "spec": {
            "rayClusterConfig": {
                "headGroupSpec": {"rayStartParams": start_params, "template": {}},
            }
        },
    }


def start_params(kmock: KubeAPI) -> dict[str, str]:
    spec = live(kmock, RAYSERVICES)["rs"]["spec"]
    params: dict[str, str] = spec["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    return params


async def merge_patch(kmock: KubeAPI, path: str, body: dict[str, Any], manager: str) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    async with kmock.patch(
        path, json=body, headers=headers, params={"fieldManager": manager}
    ) as response:
        assert response.status < 300, await response.text()


RS_PATH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/rs"


async def test_apply_creates_then_removes_what_it_no_longer_applies(
    kmock: KubeAPI, client: KubeClient
) -> None:
    first = await client.apply(rayservice(**{"num-gpus": "0", "dashboard-host": "0.0.0.0"}))
    assert first.created
    assert first.obj["metadata"]["uid"]
    owned = managers(first.obj)[(FIELD_MANAGER, "Apply")]
    assert ("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-gpus") in owned
    again = await client.apply(rayservice(**{"num-gpus": "0", "dashboard-host": "0.0.0.0"}))
    assert not again.created
    assert not again.changed  # a no-op apply keeps the resourceVersion
    assert again.obj["metadata"]["resourceVersion"] == first.obj["metadata"]["resourceVersion"]
    smaller = await client.apply(rayservice(**{"num-gpus": "0"}))
    assert smaller.changed
    assert start_params(kmock) == {"num-gpus": "0"}
    assert live(kmock, RAYSERVICES)["rs"]["metadata"]["uid"] == first.obj["metadata"]["uid"]


async def test_apply_keeps_fields_another_manager_also_owns(
    kmock: KubeAPI, client: KubeClient
) -> None:
    await client.apply(rayservice(**{"num-gpus": "0", "block": "true", "include-log": "1"}))
    # Another applier sets one of them to the same value: shared ownership, no conflict.
    headers = {"Content-Type": "application/apply-patch+yaml"}
    async with kmock.patch(
        RS_PATH, json=rayservice(block="true"), headers=headers, params={"fieldManager": "other"}
    ) as response:
        assert response.status == 200, await response.text()
    # kubectl edit adds a field: its manager owns it (an Update owns what it changed).
    params = {"object-store-memory": "1000"}
    body = {"spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": params}}}}
    await merge_patch(kmock, RS_PATH, body, "kubectl-edit")
    await client.apply(rayservice(**{"num-gpus": "0"}))
    # "block" stays (shared); "include-log" was the operator's alone and goes.
    assert start_params(kmock) == {"num-gpus": "0", "block": "true", "object-store-memory": "1000"}


async def test_apply_conflicts_name_the_other_manager_unless_forced(
    kmock: KubeAPI, client: KubeClient
) -> None:
    await client.apply(rayservice(**{"num-gpus": "0"}))
    body = {"spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {"num-gpus": "2"}}}}}
    await merge_patch(kmock, RS_PATH, body, "kubectl-edit")
    with pytest.raises(KubeError) as caught:
        await client.apply(rayservice(**{"num-gpus": "0"}))
    assert caught.value.status == 409
    assert caught.value.conflicting_managers == ["kubectl-edit"]
    assert start_params(kmock) == {"num-gpus": "2"}
    forced = await client.apply(rayservice(**{"num-gpus": "0"}), force=True)
    assert start_params(kmock) == {"num-gpus": "0"}
    assert ("kubectl-edit", "Update") not in managers(forced.obj)


async def test_apply_of_a_kind_not_served_is_404(kmock: KubeAPI) -> None:
    client = KubeClient(kopf.ConnectionInfo(server=str(kmock.url), insecure=True))
    try:
        with pytest.raises(KubeError) as caught:
            await client.apply(rayservice())  # KubeRay's CRD is not installed
        assert caught.value.status == 404
    finally:
        await client.close()


async def test_converge_removes_a_ray_start_param_dropped_from_the_render(
    kmock: KubeAPI, client: KubeClient
) -> None:
    """A rayStartParam the renderer stops emitting leaves the RayService (merge patches
    judged by a subset check kept it forever)."""
    manifest = example("tiny-cpu")
    manifest["metadata"]["uid"] = "3f2a9c4e-1b7d-4e2f-9a6c-5d8e7f1a2b3c"
    rendered = reconcile.render.render(manifest)
    rs = next(c for c in rendered if c["kind"] == "RayService")
    extended = copy.deepcopy(rs)
    head = extended["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParams"]["object-store-memory"] = "1000000000"
    said: list[tuple[str, str, str]] = []

    def say(level: str, reason: str, message: str) -> None:
        said.append((level, reason, message))

    await reconcile.converge(client, [extended], NAMESPACE, "tiny", False, say)
    assert (
        "object-store-memory"
        in live(kmock, RAYSERVICES)["tiny"]["spec"]["rayClusterConfig"]["headGroupSpec"][
            "rayStartParams"
        ]
    )
    _, _, patched, _ = await reconcile.converge(client, [rs], NAMESPACE, "tiny", False, say)
    assert patched == ["RayService/tiny"]
    got = live(kmock, RAYSERVICES)["tiny"]["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert (
        got["rayStartParams"] == rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    )
    assert not said


def _node_selectors(kmock: KubeAPI, name: str) -> list[dict[str, str]]:
    cluster = live(kmock, RAYSERVICES)[name]["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"].get("nodeSelector", {}) for group in groups]


async def test_a_node_selector_entry_removed_from_the_spec_leaves_the_rayservice(
    kmock: KubeAPI,
) -> None:
    kmock.install_crds()
    manifest = example("tiny-cpu")
    manifest["spec"]["nodeSelector"] = {"pool": "cpu", "zone": "a"}
    async with running_operator(kmock):
        await create(kmock, manifest)
        await eventually(
            lambda: _node_selectors(kmock, "tiny")[0] == {"pool": "cpu", "zone": "a"},
            what="the RayService with both nodeSelector entries",
        )
        await patch(kmock, llmd_path("tiny"), {"spec": {"nodeSelector": {"zone": None}}})
        await eventually(
            lambda: all(s == {"pool": "cpu"} for s in _node_selectors(kmock, "tiny")),
            what="the zone entry removed from every Ray pod template",
        )


async def test_a_field_another_manager_changed_is_reported_and_restored(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock, converge_interval_s=0.5):
        await create(kmock, example("tiny-cpu"))
        await eventually(lambda: live(kmock, RAYSERVICES).get("tiny"), what="the RayService")
        path = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/tiny"
        edit = {
            "spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {"num-gpus": "1"}}}}
        }
        # What `kubectl edit` sends: a merge patch under its own field manager.
        await merge_patch(kmock, path, edit, "kubectl-edit")

        def overridden() -> dict[str, Any] | None:
            return next(
                (
                    e
                    for e in live(kmock, "v1/events").values()
                    if e.get("reason") == "ConflictOverridden"
                ),
                None,
            )

        event = await eventually(overridden, what="a ConflictOverridden Event")
        assert "kubectl-edit" in event["message"]
        assert event["type"] == "Warning"
        await eventually(
            lambda: (
                live(kmock, RAYSERVICES)["tiny"]["spec"]["rayClusterConfig"]["headGroupSpec"][
                    "rayStartParams"
                ]["num-gpus"]
                == "0"
            ),
            what="the operator's value back",
        )

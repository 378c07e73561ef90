"""The fake API server refuses and rewrites what a kube-apiserver refuses and rewrites.

Each test names the upstream code whose behaviour it pins (see tests/fakes/kube_rules.py).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmops_gateway.keys import FileKeyStore, Tenant
from tests.fakes.kube_api import APPLY_PATCH, KubeAPI
from tests.integration.gateway_fixtures import gateway, stub_upstream
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

MERGE = {"Content-Type": "application/merge-patch+json"}
PVCS = f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims"
JOBS = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
LLMDS = f"/apis/llmops.dev/v1alpha1/namespaces/{NAMESPACE}/llmdeployments"


async def call(
    api: KubeAPI, method: str, path: str, body: Any = None, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    """One request; the status and the decoded answer."""
    headers = kwargs.pop("headers", MERGE if method == "PATCH" else {})
    async with api.request(method, path, json=body, headers=headers, **kwargs) as response:
        answer: dict[str, Any] = json.loads(await response.text() or "{}")
        return response.status, answer


async def tiny(api: KubeAPI, **spec: Any) -> dict[str, Any]:
    manifest = example("tiny-cpu")
    manifest["metadata"]["namespace"] = NAMESPACE
    manifest["spec"].update(spec)
    return await create(api, manifest)


# --- 1. the scale subresource -----------------------------------------------------------------


async def test_scale_get_answers_an_autoscaling_v1_scale_from_the_crd_paths(kmock: KubeAPI) -> None:
    """apiextensions-apiserver pkg/registry/customresource/etcd.go scaleFromCustomResource:
    spec.replicas from specReplicasPath, status.replicas from statusReplicasPath, the
    selector from labelSelectorPath; the object's identity in metadata, nothing else."""
    created = await tiny(kmock, replicas=3)
    status = {"replicas": 2, "selector": "llmops.dev/deployment=tiny,ray.io/node-type=worker"}
    await patch(kmock, llmd_path("tiny") + "/status", {"status": status})
    code, scale = await call(kmock, "GET", llmd_path("tiny") + "/scale")
    assert code == 200, scale
    stored = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"]["metadata"]
    assert scale == {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": "tiny",
            "namespace": NAMESPACE,
            "uid": created["metadata"]["uid"],
            "resourceVersion": stored["resourceVersion"],
            "creationTimestamp": created["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": 3},
        "status": status,
    }
    code, missing = await call(kmock, "GET", llmd_path("nothing") + "/scale")
    assert (code, missing["reason"]) == (404, "NotFound")


async def test_scale_put_and_patch_write_spec_replicas_and_answer_a_scale(kmock: KubeAPI) -> None:
    """etcd.go ScaleREST.Update as the HPA drives it: GET the Scale, PUT it back with new
    replicas; its resourceVersion is the precondition (409 when stale); replicas < 0 is 422
    (pkg/apis/autoscaling/validation ValidateScale); the answer is a Scale."""
    await tiny(kmock, replicas=1)
    _, scale = await call(kmock, "GET", llmd_path("tiny") + "/scale")
    read_at = scale["metadata"]["resourceVersion"]
    scale["spec"]["replicas"] = 4
    code, written = await call(kmock, "PUT", llmd_path("tiny") + "/scale", scale)
    assert code == 200, written
    assert written["kind"] == "Scale"
    assert written["spec"] == {"replicas": 4}
    assert written["metadata"]["resourceVersion"] != read_at
    stored = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"]
    assert stored["spec"]["replicas"] == 4
    assert stored["spec"]["models"], "a Scale PUT must not replace the object"
    assert stored["metadata"]["generation"] == 2
    code, conflict = await call(kmock, "PUT", llmd_path("tiny") + "/scale", scale)
    assert (code, conflict["reason"]) == (409, "Conflict"), conflict
    code, patched = await call(
        kmock, "PATCH", llmd_path("tiny") + "/scale", {"spec": {"replicas": 0}}
    )
    assert code == 200
    assert patched["kind"] == "Scale"
    assert patched["spec"] == {}
    assert live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"]["spec"]["replicas"] == 0
    code, refused = await call(
        kmock, "PATCH", llmd_path("tiny") + "/scale", {"spec": {"replicas": -1}}
    )
    assert (code, refused["reason"]) == (422, "Invalid")
    assert refused["details"]["causes"][0]["field"] == "spec.replicas"


LLMMODELS = f"/apis/llmops.dev/v1alpha1/namespaces/{NAMESPACE}/llmmodels"


async def test_llmmodel_scale_follows_its_crd_and_the_writer_owns_spec_replicas(
    kmock: KubeAPI,
) -> None:
    """The LLMModel CRD's /scale (specReplicasPath .spec.replicas, statusReplicasPath
    .status.replicas, labelSelectorPath .status.selector) as etcd.go ScaleREST serves it; the
    scale's writer becomes spec.replicas' manager (k8s.io/apimachinery/pkg/util/managedfields),
    so an apply by the creator that leaves spec.replicas out keeps the scaled value; the CRD's
    schema refuses a negative count on the main resource too."""
    body = {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "LLMModel",
        "metadata": {"name": "team-code", "namespace": NAMESPACE},
        "spec": {"deployment": "team", "model": "code", "replicas": 0},
    }
    code, made = await call(
        kmock, "POST", LLMMODELS, body, params={"fieldManager": "llmops-operator"}
    )
    assert code < 300, made
    selector = "llmops.dev/deployment=team,ray.io/node-type=worker,ray.io/group=code"
    await call(
        kmock,
        "PATCH",
        f"{LLMMODELS}/team-code/status",
        {"status": {"replicas": 0, "selector": selector}},
    )
    code, scale = await call(kmock, "GET", f"{LLMMODELS}/team-code/scale")
    assert code == 200, scale
    assert (scale["spec"], scale["status"]) == ({}, {"replicas": 0, "selector": selector})
    scale["spec"]["replicas"] = 2
    code, written = await call(
        kmock,
        "PUT",
        f"{LLMMODELS}/team-code/scale",
        scale,
        params={"fieldManager": "kube-controller-manager"},
    )
    assert (code, written["spec"]) == (200, {"replicas": 2}), written
    stored = live(kmock, "llmops.dev/v1alpha1/llmmodels")["team-code"]
    owners = {entry["manager"]: entry["fieldsV1"] for entry in stored["metadata"]["managedFields"]}
    assert "f:replicas" in owners["kube-controller-manager"]["f:spec"]
    assert "f:replicas" not in (owners["llmops-operator"].get("f:spec") or {})
    applied = copy.deepcopy(body)
    del applied["spec"]["replicas"]
    applied["metadata"]["labels"] = {"llmops.dev/model": "code"}
    code, after = await call(
        kmock,
        "PATCH",
        f"{LLMMODELS}/team-code",
        applied,
        headers={"Content-Type": APPLY_PATCH},
        params={"fieldManager": "llmops-operator"},
    )
    assert code == 200, after
    assert after["spec"]["replicas"] == 2
    code, refused = await call(kmock, "PATCH", f"{LLMMODELS}/team-code", {"spec": {"replicas": -1}})
    assert (code, refused["reason"]) == (422, "Invalid"), refused


# --- 2. validation against the generated CRD ------------------------------------------------


async def test_llmdeployment_writes_are_validated_against_the_crd(kmock: KubeAPI) -> None:
    """apiextensions-apiserver: structural schema errors, then CEL rules
    (pkg/apiserver/schema/cel/validation.go), answered 422 Invalid with a cause per field."""
    manifest = example("tiny-cpu")
    manifest["spec"]["replicas"] = 2000
    code, answer = await call(kmock, "POST", LLMDS, manifest)
    assert (code, answer["reason"]) == (422, "Invalid"), answer
    assert [c["field"] for c in answer["details"]["causes"]] == ["spec.replicas"]
    assert answer["message"].startswith('LLMDeployment.llmops.dev "tiny" is invalid: spec.replicas')

    manifest = example("tiny-cpu")
    manifest["metadata"]["name"] = "x" * 48
    code, answer = await call(kmock, "POST", LLMDS, manifest)
    assert code == 422, answer
    assert "at most 47 characters" in answer["details"]["causes"][0]["message"]

    await tiny(kmock)
    code, answer = await call(kmock, "PATCH", llmd_path("tiny"), {"spec": {"models": None}})
    assert code == 422, answer
    assert answer["details"]["causes"][0] == {
        "reason": "FieldValueRequired",
        "message": "Required value",
        "field": "spec.models",
    }
    assert live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"]["spec"]["models"]


async def test_cel_rules_ratchet_over_unchanged_values(kmock: KubeAPI) -> None:
    """CRDValidationRatcheting (k8s.io/apiextensions-apiserver, on by default since 1.30): an
    object stored before a CEL rule existed may still be written where the rule's value is
    unchanged (its status, its labels); a change to that value is checked."""
    kmock.cel_rules = False  # stored under an older CRD
    manifest = example("tiny-cpu")
    manifest["spec"]["router"] = {"defaultModel": "missing"}
    await create(kmock, manifest)
    kmock.cel_rules = True
    await patch(kmock, llmd_path("tiny") + "/status", {"status": {"ready": "False"}})
    await patch(kmock, llmd_path("tiny"), {"metadata": {"labels": {"team": "a"}}})
    code, answer = await call(kmock, "PATCH", llmd_path("tiny"), {"spec": {"replicas": 2}})
    assert code == 422, answer
    assert answer["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": 'Invalid value: "object": router.defaultModel must name one of spec.models',
            "field": "spec.router.defaultModel",
        }
    ]


async def test_llmdeployments_are_defaulted_and_pruned(kmock: KubeAPI) -> None:
    """apiextensions-apiserver pkg/apiserver/schema/defaulting and pruning: schema defaults
    fill absent fields; unknown fields are dropped, or refused with 400 under
    fieldValidation=Strict (what kubectl sends)."""
    manifest = example("tiny-cpu")
    del manifest["spec"]["replicas"]
    manifest["spec"]["replicaz"] = 3
    code, stored = await call(kmock, "POST", LLMDS, manifest)
    assert code < 300, stored
    assert stored["spec"]["replicas"] == 1
    assert "replicaz" not in stored["spec"]
    assert stored["spec"]["models"][0]["engine"]["dtype"] == "auto"

    manifest["metadata"]["name"] = "strict"
    code, answer = await call(kmock, "POST", LLMDS, manifest, params={"fieldValidation": "Strict"})
    assert (code, answer["reason"]) == (400, "BadRequest"), answer
    assert 'unknown field "spec.replicaz"' in answer["message"]


# --- 3. immutable fields ----------------------------------------------------------------------


def pvc(size: str = "10Gi", mode: str = "ReadWriteOnce") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "cache", "namespace": NAMESPACE},
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}},
    }


async def test_pvc_spec_is_immutable_except_growing_a_bound_claim(kmock: KubeAPI) -> None:
    """pkg/apis/core/validation/validation.go ValidatePersistentVolumeClaimUpdate (1.33, with
    RecoverVolumeExpansionFailure): only a Bound claim's storage request may change, and it
    may not go down to status.capacity or below."""
    assert (await call(kmock, "POST", PVCS, pvc()))[0] < 300
    path = f"{PVCS}/cache"
    code, answer = await call(kmock, "PATCH", path, {"spec": {"accessModes": ["ReadWriteMany"]}})
    assert (code, answer["reason"]) == (422, "Invalid"), answer
    assert answer["message"].startswith(
        'PersistentVolumeClaim "cache" is invalid: spec: Forbidden: spec is immutable after'
        " creation except resources.requests and volumeAttributesClassName for bound claims"
    )
    grow = {"spec": {"resources": {"requests": {"storage": "20Gi"}}}}
    code, answer = await call(kmock, "PATCH", path, grow)
    assert code == 422, "a Pending claim cannot be resized"
    bound = {"status": {"phase": "Bound", "capacity": {"storage": "10Gi"}}}
    assert (await call(kmock, "PATCH", path + "/status", bound))[0] == 200
    # pkg/registry/core/persistentvolumeclaim/strategy.go: the main resource keeps status.
    assert (await call(kmock, "PATCH", path, {"status": {"phase": "Lost"}}))[0] == 200
    assert live(kmock, "v1/persistentvolumeclaims")["cache"]["status"]["phase"] == "Bound"
    code, answer = await call(kmock, "PATCH", path, grow)
    assert code == 200, answer
    back = {"spec": {"resources": {"requests": {"storage": "15Gi"}}}}
    assert (await call(kmock, "PATCH", path, back))[0] == 200, "recovering a failed expansion"
    shrink = {"spec": {"resources": {"requests": {"storage": "10240Mi"}}}}
    code, answer = await call(kmock, "PATCH", path, shrink)
    assert code == 422, answer
    assert answer["details"]["causes"] == [
        {
            "reason": "FieldValueForbidden",
            "message": "Forbidden: field can not be less than status.capacity",
            "field": "spec.resources.requests.storage",
        }
    ]


async def test_job_template_and_selector_are_immutable(kmock: KubeAPI) -> None:
    """pkg/apis/batch/validation/validation.go ValidateJobSpecUpdate: ValidateImmutableField
    on spec.selector and spec.template ("field is immutable"); parallelism may change."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "loader", "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"job": "loader"}},
            "template": {
                "metadata": {"labels": {"job": "loader"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "load", "image": "loader:1"}],
                },
            },
        },
    }
    assert (await call(kmock, "POST", JOBS, job))[0] < 300
    image = {
        "spec": {"template": {"spec": {"containers": [{"name": "load", "image": "loader:2"}]}}}
    }
    code, answer = await call(kmock, "PATCH", f"{JOBS}/loader", image)
    assert (code, answer["reason"]) == (422, "Invalid"), answer
    assert answer["message"].startswith('Job.batch "loader" is invalid: spec.template: Invalid')
    assert answer["message"].endswith("field is immutable")
    selector = {"spec": {"selector": {"matchLabels": {"job": "other"}}}}
    code, answer = await call(kmock, "PATCH", f"{JOBS}/loader", selector)
    assert code == 422
    assert answer["details"]["causes"][0]["field"] == "spec.selector"
    assert (await call(kmock, "PATCH", f"{JOBS}/loader", {"spec": {"parallelism": 2}}))[0] == 200


# --- 4. stale writes --------------------------------------------------------------------------


async def test_writes_naming_an_old_resource_version_conflict(kmock: KubeAPI) -> None:
    """k8s.io/apiserver pkg/registry/generic/registry/store.go Update: a resourceVersion in
    the written object (PUT, merge patch, apply) that is not the stored one is 409 Conflict."""
    created = await tiny(kmock)
    old = created["metadata"]["resourceVersion"]
    await patch(kmock, llmd_path("tiny"), {"metadata": {"labels": {"team": "a"}}})
    conflict = (
        'Operation cannot be fulfilled on llmdeployments.llmops.dev "tiny": the object has been'
        " modified; please apply your changes to the latest version and try again"
    )
    stale_patch = {"metadata": {"resourceVersion": old}, "spec": {"replicas": 2}}
    code, answer = await call(kmock, "PATCH", llmd_path("tiny"), stale_patch)
    assert (code, answer["message"]) == (409, conflict), answer
    code, answer = await call(kmock, "PUT", llmd_path("tiny"), created)
    assert (code, answer["message"]) == (409, conflict), answer
    applied = {**example("tiny-cpu"), "metadata": {"name": "tiny", "resourceVersion": old}}
    code, answer = await call(
        kmock,
        "PATCH",
        llmd_path("tiny"),
        applied,
        headers={"Content-Type": APPLY_PATCH},
        params={"fieldManager": "me"},
    )
    assert (code, answer["reason"]) == (409, "Conflict"), answer
    assert live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"]["spec"]["replicas"] == 1
    current = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"]["metadata"]
    fresh = {"metadata": {"resourceVersion": current["resourceVersion"]}, "spec": {"replicas": 2}}
    assert (await call(kmock, "PATCH", llmd_path("tiny"), fresh))[0] == 200


# --- 6. generation, spec and status -----------------------------------------------------------


async def test_generation_moves_with_spec_only_and_subresources_keep_their_halves(
    kmock: KubeAPI,
) -> None:
    """apiextensions-apiserver pkg/registry/customresource/strategy.go: generation + 1 when
    anything but metadata and status changed (PUT, merge patch, apply alike); a main-resource
    write keeps status; a /status write keeps everything else."""

    def stored() -> dict[str, Any]:
        return copy.deepcopy(live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"])

    await tiny(kmock)
    await patch(kmock, llmd_path("tiny"), {"metadata": {"labels": {"team": "a"}}})
    await patch(kmock, llmd_path("tiny"), {"spec": {"autoscaling": {"enabled": False}}})
    assert stored()["metadata"]["generation"] == 1, "metadata and no-op patches keep it"
    await patch(kmock, llmd_path("tiny") + "/status", {"status": {"ready": "True"}})
    assert stored()["metadata"]["generation"] == 1

    whole = stored()
    whole["spec"]["replicas"] = 2
    whole["status"] = {"ready": "Overwritten"}
    code, answer = await call(kmock, "PUT", llmd_path("tiny"), whole)
    assert code == 200, answer
    assert stored()["metadata"]["generation"] == 2, "a spec change by PUT bumps it"
    assert stored()["status"] == {"ready": "True"}, "the main resource cannot write status"

    status_put = {**stored(), "spec": {"models": []}, "status": {"ready": "False"}}
    code, answer = await call(kmock, "PUT", llmd_path("tiny") + "/status", status_put)
    assert code == 200, answer
    assert stored()["spec"]["models"], "a /status write cannot change spec"
    assert stored()["status"] == {"ready": "False"}
    assert stored()["metadata"]["generation"] == 2

    applied = {**example("tiny-cpu"), "metadata": {"name": "tiny"}}
    applied["spec"]["replicas"] = 5
    code, answer = await call(
        kmock,
        "PATCH",
        llmd_path("tiny"),
        applied,
        headers={"Content-Type": APPLY_PATCH},
        params={"fieldManager": "me", "force": "true"},
    )
    assert code == 200, answer
    assert stored()["metadata"]["generation"] == 3


# --- 5. watches -------------------------------------------------------------------------------


async def events(
    api: KubeAPI, path: str, params: dict[str, str], until: Callable[[list[Any]], bool]
) -> list[dict[str, Any]]:
    """Reads a watch until ``until(events so far)`` holds or the stream ends."""
    seen: list[dict[str, Any]] = []
    async with api.get(path, params={"watch": "true", **params}) as response:
        assert response.status == 200
        while not until(seen):
            line = await asyncio.wait_for(response.content.readline(), 5)
            if not line:
                break
            seen.append(json.loads(line))
    return seen


async def test_watch_resumes_after_its_version_and_expires_below_the_window(
    kmock: KubeAPI,
) -> None:
    """k8s.io/apiserver pkg/storage/cacher/watch_cache.go: a watch from resourceVersion N gets
    the events after N only; from below the retained window, one ERROR event carrying a 410
    Expired Status ("too old resource version"); from "0", an ADDED per object."""
    kmock.watch_cache.capacity = 3
    await tiny(kmock)
    async with kmock.get(LLMDS) as response:
        listed = (await response.json())["metadata"]["resourceVersion"]
    await patch(kmock, llmd_path("tiny"), {"spec": {"replicas": 2}})
    got = await events(kmock, LLMDS, {"resourceVersion": listed}, lambda seen: len(seen) >= 1)
    assert [(e["type"], e["object"]["spec"]["replicas"]) for e in got] == [("MODIFIED", 2)]

    for replicas in (3, 4, 5, 6):
        await patch(kmock, llmd_path("tiny"), {"spec": {"replicas": replicas}})
    got = await events(kmock, LLMDS, {"resourceVersion": listed}, lambda seen: len(seen) >= 1)
    assert got[0]["type"] == "ERROR", got
    status = got[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith(f"too old resource version: {listed} (")

    got = await events(kmock, LLMDS, {"resourceVersion": "0"}, lambda seen: len(seen) >= 1)
    assert [(e["type"], e["object"]["spec"]["replicas"]) for e in got] == [("ADDED", 6)]


async def test_watch_sends_bookmarks_when_allowed_and_ends_at_its_timeout(kmock: KubeAPI) -> None:
    """k8s.io/apiserver pkg/storage/cacher: BOOKMARK events (kind, apiVersion and a
    resourceVersion only) with allowWatchBookmarks=true, none without; the stream ends at
    timeoutSeconds; sendInitialEvents ends its ADDED events with an initial-events-end one."""
    kmock.watch_cache.bookmark_interval_s = 0.2
    await tiny(kmock)
    params = {"resourceVersion": "0", "allowWatchBookmarks": "true", "timeoutSeconds": "1"}
    got = await events(kmock, LLMDS, params, lambda seen: False)
    kinds = [e["type"] for e in got]
    assert kinds[0] == "ADDED", kinds
    assert set(kinds[1:]) == {"BOOKMARK"}, kinds
    assert len(kinds) >= 3, kinds
    mark = got[-1]["object"]
    assert mark["kind"] == "LLMDeployment"
    assert mark["apiVersion"] == "llmops.dev/v1alpha1"
    assert int(mark["metadata"]["resourceVersion"]) >= int(
        got[0]["object"]["metadata"]["resourceVersion"]
    )
    params = {"resourceVersion": "0", "timeoutSeconds": "1"}
    assert [e["type"] for e in await events(kmock, LLMDS, params, lambda s: False)] == ["ADDED"]
    params = {"sendInitialEvents": "true", "allowWatchBookmarks": "true", "timeoutSeconds": "1"}
    got = await events(kmock, LLMDS, params, lambda seen: len(seen) >= 2)
    assert got[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def lists_of_llmdeployments(api: KubeAPI) -> int:
    return sum(
        1
        for r in api._requests
        if r.resource is not None
        and r.resource.plural == "llmdeployments"
        and r.name is None
        and str(r.method).upper().endswith("GET")
        and r.params.get("watch") != "true"
    )


async def test_kopf_relists_after_a_410(kmock: KubeAPI) -> None:
    """Kopf's continuous_watch (kopf/_cogs/clients/watching.py) returns on an ERROR 410 and
    lists again; the operator then follows changes as before."""
    kmock.install_crds()
    async with running_operator(kmock):
        await tiny(kmock)
        await eventually(lambda: live(kmock, "ray.io/v1/rayservices")["tiny"], what="RayService")
        before = lists_of_llmdeployments(kmock)
        await kmock.watch_cache.expire()
        await eventually(lambda: lists_of_llmdeployments(kmock) > before, what="a relist")
        await call(kmock, "PATCH", llmd_path("tiny") + "/scale", {"spec": {"replicas": 2}})
        await eventually(
            lambda: (
                "num_replicas: 2"
                in live(kmock, "ray.io/v1/rayservices")["tiny"]["spec"]["serveConfigV2"]
            ),
            what="the scale change rendered after the relist",
        )


async def test_gateway_discovery_relists_after_a_410(kmock: KubeAPI, tmp_path: Path) -> None:
    """gateway/llmops_gateway/discovery.py: an ERROR event (410 Expired) ends the watch and the
    gateway lists again, then routes what the status reports from then on."""
    store = FileKeyStore(tmp_path / "keys.json")
    secret = store.create(Tenant(name="team"))[1]
    manifest = example("tiny-cpu")
    manifest["metadata"]["namespace"] = NAMESPACE
    manifest["spec"]["models"][0]["name"] = "alpha"
    await create(kmock, manifest)
    with ExitStack() as stack:
        url = stack.enter_context(stub_upstream(models=("alpha",)))
        gw = stack.enter_context(
            gateway(
                tmp_path, keys_file=store.path, discover_backends=True, kube_api_url=str(kmock.url)
            )
        )
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=10) as client:

            async def models() -> list[str]:
                listing = (await client.get("/v1/models")).json()
                return sorted(m["id"] for m in listing.get("data", []))

            async def until(what: str, check: Callable[[], Any]) -> None:
                for _ in range(150):
                    if await check():
                        return
                    await asyncio.sleep(0.1)
                pytest.fail(f"not within 15 s: {what}")

            await until("listed", lambda: client.get("/readyz"))
            before = lists_of_llmdeployments(kmock)
            await kmock.watch_cache.expire()

            async def relisted() -> bool:
                return lists_of_llmdeployments(kmock) > before

            await until("a relist after 410", relisted)
            status = {"endpoints": {"http": url}, "models": [{"name": "alpha", "state": "Ready"}]}
            await patch(kmock, llmd_path("tiny") + "/status", {"status": status})

            async def routed() -> bool:
                return await models() == ["alpha"]

            await until("alpha routed after the relist", routed)

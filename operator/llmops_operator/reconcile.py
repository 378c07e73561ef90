"""One level-based reconcile pass: render, converge the children, observe, report.

Every pass compares the rendered children with what the API server holds and changes only
what differs, so it is idempotent and safe to interrupt and repeat at any point (after an
operator restart it simply runs again). It never assumes an earlier pass happened.

Status layout (``status`` of the LLMDeployment)::

    observedGeneration  metadata.generation this pass rendered
    replicas            replicas now serving: the fewest over models (statusReplicasPath)
    selector            label selector of the first model's worker pods (scale subresource)
    ready / modelsSummary / replicasSummary   short strings for `kubectl get` columns
                        (replicasSummary: "chat 2/2, code 0/0", ready/desired per model)
    conditions          ModelCached, ServingReady, AutoscalingReady, Ready (type/status/reason/
                        message/lastTransitionTime/observedGeneration)
    endpoints.http      in-cluster base URL of the graph's OpenAI-compatible API
    models[]            name, state (Pending, Loading, Ready, Failed), message, replicas and
                        readyReplicas (ready worker pods of the active cluster's group, while
                        its Serve deployment is HEALTHY), desiredReplicas (its LLMModel's
                        spec.replicas)

Each model's LLMModel (`sync_models`) carries its count; its status holds ``replicas`` (the
model's ready replicas) and ``selector`` (its worker pods), which its /scale reports.
    sources[]           source, revision: the commit each hf:// source resolved to, from the
                        loader's report (its termination message)
"""

from __future__ import annotations

import collections
import copy
import datetime
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmops_contract import API_VERSION, APP_NAME, MODEL_KIND
from llmops_operator import render
from llmops_operator.kube import KubeClient, KubeError
from llmops_operator.models import Condition, model_scaling

RAYSERVICE_CRD = "rayservices.ray.io"
SCALEDOBJECT_CRD = "scaledobjects.keda.sh"
PODMONITOR_CRD = "podmonitors.monitoring.coreos.com"
# CRD name -> (apiVersion, plural) as API discovery lists it.
PREREQUISITES = {
    RAYSERVICE_CRD: ("ray.io/v1", "rayservices"),
    SCALEDOBJECT_CRD: ("keda.sh/v1alpha1", "scaledobjects"),
    PODMONITOR_CRD: ("monitoring.coreos.com/v1", "podmonitors"),
}
APPLICATION = APP_NAME
WRITTEN_ANNOTATION = "llmops.dev/replicas-written"
"""On an LLMModel while autoscaling is off: the count the operator last wrote through from the
LLMDeployment, so it writes again only when the spec's count changes (`kubectl scale
llmmodel` holds until then)."""
# A shared cache volume still Pending after this long is not going to bind by itself.
PVC_PENDING_GRACE_S = 120.0

Say = Callable[[str, str, str], None]  # (level "info"/"warning", reason, message) -> an Event


@dataclass
class Outcome:
    """What a pass did and saw."""

    status: dict[str, Any]
    ready: bool
    desired_replicas: int = 0
    model_replicas: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(desired, ready) replicas by model name."""
    created: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def is_subset(desired: Any, observed: Any) -> bool:
    """True when every field of ``desired`` has the same value in ``observed``.

    The API server adds defaults and status; those are not drift.
    """
    if isinstance(desired, Mapping):
        return isinstance(observed, Mapping) and all(
            key in observed and is_subset(value, observed[key]) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(desired) == len(observed)
            and all(is_subset(d, o) for d, o in zip(desired, observed, strict=True))
        )
    return bool(desired == observed)


def _applicable(desired: dict[str, Any], live: Mapping[str, Any] | None) -> dict[str, Any]:
    """What to apply for a child: the rendered object, less what the API server refuses to
    change on an existing one. A Job's pod template is immutable (new sources get a new Job
    name); a PVC's spec is immutable except for the size, which only grows, and only once the
    claim is Bound (pkg/apis/core/validation, ValidatePersistentVolumeClaimUpdate: a Pending
    claim refuses any change, and that refusal would fail every pass). For those, the fields
    the operator renders keep the values the live object holds, so the apply neither changes
    nor drops them; a growth waits for the claim to bind.
    """
    kind = desired["kind"]
    if live is None or kind not in {"Job", "PersistentVolumeClaim"}:
        return desired
    spec = _live_values(desired["spec"], live.get("spec", {}))
    if kind == "PersistentVolumeClaim":
        want = desired["spec"]["resources"]["requests"]["storage"]
        have = live.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")
        bound = (live.get("status") or {}).get("phase") == "Bound"
        if have is None or (bound and quantity(want) >= quantity(have)):
            spec["resources"] = desired["spec"]["resources"]
    return {**desired, "spec": spec}


def _live_values(desired: Any, live: Any) -> Any:
    """The fields of ``desired`` that ``live`` has, with ``live``'s values."""
    if isinstance(desired, Mapping) and isinstance(live, Mapping):
        return {k: _live_values(v, live[k]) for k, v in desired.items() if k in live}
    return copy.deepcopy(live)


_QUANTITY_UNITS: dict[str, float] = {
    **{s: 1024**i for i, s in enumerate(["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"])},
    **{s: 1000**i for i, s in enumerate(["k", "M", "G", "T", "P", "E"], start=1)},
}


def quantity(text: str) -> float:
    """A Kubernetes storage quantity in bytes ("80Gi", "500M", "1e3")."""
    match = re.fullmatch(r"([0-9.]+(?:[eE][0-9]+)?)([A-Za-z]*)", str(text).strip())
    if match is None or match.group(2) not in _QUANTITY_UNITS:
        raise ValueError(f"not a quantity: {text!r}")
    number, unit = str(match.group(1)), str(match.group(2))
    return float(number) * _QUANTITY_UNITS[unit]


def _key(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def make_condition(
    type_: str, ok: bool | None, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return Condition(
        type=type_, status=status, reason=reason, message=message, observed_generation=generation
    ).model_dump(by_alias=True, exclude_none=True)


def stamp_transitions(
    conditions: list[dict[str, Any]], previous: list[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Keeps lastTransitionTime unless the status changed."""
    before = {c.get("type"): c for c in previous}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for cond in conditions:
        old = before.get(cond["type"])
        same = old is not None and old.get("status") == cond["status"]
        cond["lastTransitionTime"] = old.get("lastTransitionTime", now) if same and old else now
    return conditions


async def converge(
    client: KubeClient,
    children: list[dict[str, Any]],
    namespace: str,
    name: str,
    keda_installed: bool,
    say: Say,
    for_cluster: Callable[[str], list[dict[str, Any]]] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str], list[str], list[str]]:
    """Applies each child (server-side apply); deletes this deployment's children no longer
    rendered.

    The graph Service is applied after the RayService, from ``for_cluster(active)`` once the
    RayService names an active cluster, so it selects that cluster's pods only.

    A field another manager set (``kubectl edit``, another controller) to a value other than
    the rendered one is a conflict: it is reported as a ConflictOverridden Event, then the
    rendered value is applied with force, since the operator owns every field it renders.

    Returns:
        The observed children by "Kind/name", and the keys created, patched and deleted.
    """
    selector = {render.DEPLOYMENT_LABEL: name, render.MANAGED_BY_LABEL: render.MANAGED_BY}
    jobs = await client.list("batch/v1", "Job", namespace, selector)
    live_jobs = {job["metadata"]["name"]: job for job in jobs}
    observed: dict[str, dict[str, Any]] = {}
    created: list[str] = []
    patched: list[str] = []
    for child in children:
        meta = child["metadata"]
        key = _key(child)
        active = active_cluster(observed.get(f"RayService/{name}"))
        if child["kind"] == "Service" and for_cluster is not None and active:
            child = next(c for c in for_cluster(active) if _key(c) == key)
        live: Mapping[str, Any] | None = None
        if child["kind"] == "Job":
            live = live_jobs.get(meta["name"])
        elif child["kind"] == "PersistentVolumeClaim":
            live = await client.get(child["apiVersion"], child["kind"], namespace, meta["name"])
        desired = _applicable(child, live)
        try:
            applied = await client.apply(desired)
        except KubeError as exc:
            if exc.status != 409:
                raise
            managers = ", ".join(exc.conflicting_managers) or "another field manager"
            say(
                "warning",
                "ConflictOverridden",
                f"{key}: fields set by {managers} differ from the spec; the spec's values "
                "are applied (change the LLMDeployment instead)",
            )
            applied = await client.apply(desired, force=True)
        if applied.created:
            created.append(key)
        elif applied.changed:
            patched.append(key)
        observed[key] = applied.obj
    deleted = await _prune(client, children, jobs, namespace, name, keda_installed)
    return observed, created, patched, deleted


async def live_models(client: KubeClient, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    """This deployment's LLMModels by model name."""
    selector = {render.DEPLOYMENT_LABEL: name, render.MANAGED_BY_LABEL: render.MANAGED_BY}
    found = await client.list(API_VERSION, MODEL_KIND, namespace, selector)
    return {
        str(obj["spec"]["model"]): obj
        for obj in found
        if (obj.get("spec") or {}).get("deployment") == name and not _deleting(obj)
    }


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def model_counts(target: render.Target, live: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Each model's count: its LLMModel's spec.replicas (KEDA's, `kubectl scale`'s or the
    one it was created with); with autoscaling off, the spec's count once it changed since
    the operator last wrote it (WRITTEN_ANNOTATION); a model without an LLMModel yet, the
    spec's count."""
    counts = {}
    autoscaled = target.spec.autoscaling.enabled
    for model in target.spec.models:
        wanted = model_scaling(target.spec, model).replicas
        obj = live.get(model.name)
        if obj is None:
            counts[model.name] = wanted
            continue
        written = (obj["metadata"].get("annotations") or {}).get(WRITTEN_ANNOTATION)
        if not autoscaled and written != str(wanted):
            counts[model.name] = wanted
        else:
            counts[model.name] = int(obj["spec"].get("replicas") or 0)
    return counts


async def sync_models(
    client: KubeClient,
    target: render.Target,
    rendered: list[dict[str, Any]],
    live: Mapping[str, Mapping[str, Any]],
    counts: Mapping[str, int],
) -> tuple[dict[str, dict[str, Any]], list[str], list[str], list[str]]:
    """Creates, updates and prunes the LLMModels; their spec.replicas is set once.

    A new LLMModel is created (POST) with its first count. After that the operator applies it
    without spec.replicas, which KEDA's HPA and `kubectl scale` own: the create's fields
    belong to the manager's Update entry, so the apply, which leaves spec.replicas out, does
    not remove it (k8s.io/apimachinery/pkg/util/managedfields). With autoscaling off, a
    changed spec count is written through with a merge patch and remembered in
    WRITTEN_ANNOTATION.

    Returns:
        The LLMModels by model name as the API server holds them, and the keys created,
        patched and deleted.
    """
    created: list[str] = []
    patched: list[str] = []
    deleted: list[str] = []
    observed: dict[str, dict[str, Any]] = {}
    autoscaled = target.spec.autoscaling.enabled
    for obj in rendered:
        model = obj["spec"]["model"]
        key = _key(obj)
        desired = copy.deepcopy(obj)
        if not autoscaled:
            desired["metadata"]["annotations"] = {WRITTEN_ANNOTATION: str(counts[model])}
        current = live.get(model)
        if current is None:
            made = await client.create(desired)
            if made is not None:
                created.append(key)
                observed[model] = made
                continue
        elif int(current["spec"].get("replicas") or 0) != counts[model]:
            # Autoscaling off and the spec's count changed: write it through.
            await client.merge_patch(
                API_VERSION,
                MODEL_KIND,
                target.namespace,
                obj["metadata"]["name"],
                {"spec": {"replicas": counts[model]}},
            )
            patched.append(key)
        del desired["spec"]["replicas"]
        applied = await client.apply(desired, force=True)
        if applied.changed and key not in patched:
            patched.append(key)
        observed[model] = applied.obj
    wanted = {obj["spec"]["model"] for obj in rendered}
    for model, gone in live.items():
        if model not in wanted:
            await client.delete(API_VERSION, MODEL_KIND, target.namespace, gone["metadata"]["name"])
            deleted.append(f"{MODEL_KIND}/{gone['metadata']['name']}")
    return observed, created, patched, deleted


async def report_models(
    client: KubeClient,
    target: render.Target,
    observed: Mapping[str, Mapping[str, Any]],
    ready: Mapping[str, int],
) -> None:
    """Writes each LLMModel's status (ready replicas, its workers' selector) when it differs:
    what its /scale reports to the HPA and `kubectl get llmmodels` shows."""
    for model, obj in observed.items():
        status = {
            "replicas": ready.get(model, 0),
            "selector": render.worker_selector(target.name, model),
        }
        if is_subset(status, obj.get("status") or {}):
            continue
        await client.merge_patch(
            API_VERSION,
            MODEL_KIND,
            target.namespace,
            obj["metadata"]["name"],
            {"status": status},
            subresource="status",
        )


def active_cluster(rayservice: Mapping[str, Any] | None) -> str | None:
    """The RayCluster serving now, as KubeRay (ray.io/v1) reports it in the RayService's
    status.activeServiceStatus.rayClusterName; None before one is active."""
    status = (rayservice or {}).get("status") or {}
    cluster = (status.get("activeServiceStatus") or {}).get("rayClusterName")
    return str(cluster) if cluster else None


def stale_cluster(live: Mapping[str, Any], rayservice: Mapping[str, Any]) -> bool:
    """True when a RayCluster's pods are of an older spec than the rendered RayService's.

    Compares the cluster hash the renderer stamps on the head pod template (every pod-level
    change, worker bounds excluded); a cluster without it predates the stamp.
    """

    def stamp(cluster_spec: Mapping[str, Any]) -> str | None:
        head = (cluster_spec.get("headGroupSpec") or {}).get("template") or {}
        value = ((head.get("metadata") or {}).get("annotations") or {}).get(
            render.CLUSTER_HASH_ANNOTATION
        )
        return str(value) if value else None

    wanted = stamp(rayservice["spec"]["rayClusterConfig"])
    return wanted is not None and stamp(live.get("spec") or {}) != wanted


async def sync_worker_bounds(
    client: KubeClient, live: Mapping[str, Any], rayservice: Mapping[str, Any]
) -> bool:
    """Copies the rendered worker groups' minReplicas/maxReplicas onto the active RayCluster.

    KubeRay decides whether a RayService's cluster changed from a hash that leaves out the
    worker groups' Replicas/MinReplicas/MaxReplicas (ray-operator/controllers/ray/utils/
    util.go), so new bounds never reach a running cluster through the RayService. A JSON patch
    with a ``test`` on each group's name changes only the bounds of the group it read;
    ``replicas`` stays with KubeRay's autoscaler.

    Returns:
        True when the RayCluster was patched.
    """
    namespace, cluster = live["metadata"]["namespace"], live["metadata"]["name"]
    config = rayservice["spec"]["rayClusterConfig"]
    wanted = {group["groupName"]: group for group in config.get("workerGroupSpecs", [])}
    operations: list[dict[str, Any]] = []
    for index, group in enumerate(live.get("spec", {}).get("workerGroupSpecs") or []):
        want = wanted.get(group.get("groupName"))
        if want is None:
            continue
        changes = [
            (bound, want[bound])
            for bound in ("minReplicas", "maxReplicas")
            if bound in want and group.get(bound) != want[bound]
        ]
        if not changes:
            continue
        path = f"/spec/workerGroupSpecs/{index}"
        operations.append({"op": "test", "path": f"{path}/groupName", "value": group["groupName"]})
        operations += [{"op": "add", "path": f"{path}/{b}", "value": v} for b, v in changes]
    if not operations:
        return False
    try:
        await client.json_patch("ray.io/v1", "RayCluster", namespace, cluster, operations)
    except KubeError as exc:
        if exc.status == 422:  # the groups changed under us: the next pass reads them again
            return False
        raise
    return True


async def worker_pods(
    client: KubeClient, namespace: str, cluster: str | None
) -> list[dict[str, Any]]:
    """The active cluster's worker pods, selected by KubeRay's labels (ray.io/cluster,
    ray.io/node-type), never by name; a pending cluster's pods do not serve yet."""
    if cluster is None:
        return []
    labels = {render.RAY_CLUSTER_LABEL: cluster, render.RAY_NODE_TYPE_LABEL: "worker"}
    return await client.list("v1", "Pod", namespace, labels)


def ready_workers(pods: list[dict[str, Any]]) -> collections.Counter[str]:
    """Ready pods by worker group (= model name)."""
    return collections.Counter(
        pod["metadata"]["labels"].get(render.RAY_GROUP_LABEL, "")
        for pod in pods
        if not pod["metadata"].get("deletionTimestamp")
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (pod.get("status") or {}).get("conditions") or []
        )
    )


@dataclass
class FetchReports:
    """What the loader containers said when they ended (their termination messages).

    A loader writes ``{"sources": {SOURCE: {"revision": ...}}}`` there on success
    (`llmops fetch --report`); on failure the kubelet puts the end of its log there
    (terminationMessagePolicy FallbackToLogsOnError).
    """

    revisions: dict[str, collections.Counter[str]] = field(default_factory=dict)
    error: str | None = None

    def add(self, pod: Mapping[str, Any], container: str) -> None:
        status = pod.get("status") or {}
        for entry in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
            if entry.get("name") != container:
                continue
            # The state first: a container that failed before and ended well since counts
            # as ended well; lastState holds the failure of a container now restarting.
            for state in (entry.get("state") or {}, entry.get("lastState") or {}):
                ended = state.get("terminated")
                if ended is None:
                    continue
                message = str(ended.get("message") or "").strip()
                if ended.get("exitCode") == 0:
                    self._add_report(message)
                else:
                    self.error = _last_error(message) or (
                        f"container {container} of pod {pod['metadata']['name']} exited with "
                        f"{ended.get('exitCode')} ({ended.get('reason') or 'no reason'})"
                    )
                return

    def _add_report(self, message: str) -> None:
        try:
            found = json.loads(message).get("sources", {})
        except (ValueError, AttributeError):
            return
        if not isinstance(found, dict):
            return
        for source, entry in found.items():
            revision = entry.get("revision") if isinstance(entry, dict) else None
            counted = self.revisions.setdefault(str(source), collections.Counter())
            if revision:
                counted[str(revision)] += 1

    def sources_status(
        self, wanted: list[str], previous: list[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """status.sources for the wanted sources, and a warning per source whose pods
        resolved it to different commits (an unpinned hf:// branch that moved)."""
        before = {str(e.get("source")): e for e in previous if isinstance(e, Mapping)}
        entries, warnings = [], []
        for source in wanted:
            seen = self.revisions.get(source)
            if seen is None:
                if source in before:
                    entries.append(dict(before[source]))
                continue
            entry: dict[str, Any] = {"source": source}
            if seen:
                entry["revision"] = seen.most_common(1)[0][0]
            if len(seen) > 1:
                warnings.append(
                    f"{source} resolved to {len(seen)} commits across the Ray pods "
                    f"({', '.join(sorted(seen))}): pin one (hf://org/name@<commit>) so every "
                    "replica serves the same weights"
                )
            entries.append(entry)
        return entries, warnings


def _last_error(message: str) -> str | None:
    """The loader's error line from the end of its log (`llmops fetch` prints "error: ...")."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()[:1000]
    return lines[-1][:1000] if lines else None


JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
"""The label the Job controller sets on a Job's pods (Kubernetes >= 1.27)."""


async def loader_reports(
    client: KubeClient,
    namespace: str,
    job: Mapping[str, Any] | None,
    wanted: list[str],
    recorded: set[str],
) -> FetchReports:
    """The loader Job's reports: read once it ended and its sources are not in status yet,
    and while its tries fail (their errors)."""
    needed = not set(wanted) <= recorded
    reports = FetchReports()
    if job is None:
        return reports
    status = job.get("status") or {}
    finished = any(
        c.get("type") in {"Complete", "Failed"} and c.get("status") == "True"
        for c in status.get("conditions", [])
    )
    if not (finished and needed) and not status.get("failed"):
        return reports
    pods = await client.list("v1", "Pod", namespace, {JOB_NAME_LABEL: job["metadata"]["name"]})
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("creationTimestamp") or "")):
        reports.add(pod, render.LOADER_CONTAINER)
    if status.get("succeeded"):
        # A finished Job whose pod is gone (or said nothing) is not asked again each pass:
        # its sources are recorded, without the commits nobody reported.
        for source in wanted:
            reports.revisions.setdefault(source, collections.Counter())
    return reports


async def credentials_version(
    client: KubeClient, namespace: str, secret: str | None
) -> tuple[str | None, bool]:
    """The resourceVersion of the credentials Secret, and whether it is missing.

    The version names the loader Job, so a Secret fixed after a failed download gets a new
    Job. Without the right to read Secrets (403) the version is unknown, not missing.
    """
    if not secret:
        return None, False
    try:
        found = await client.get("v1", "Secret", namespace, secret, metadata_only=True)
    except KubeError as exc:
        if exc.status == 403:
            return None, False
        raise
    if found is None:
        return None, True
    return str(found.get("metadata", {}).get("resourceVersion") or "") or None, False


async def _prune(
    client: KubeClient,
    children: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    namespace: str,
    name: str,
    keda_installed: bool,
) -> list[str]:
    """Deletes loader Jobs of older cache contents and ScaledObjects no longer wanted (a
    removed model's, every one with autoscaling off, and the single ScaledObject of the whole
    deployment that per-model scaling replaced)."""
    wanted = {_key(c) for c in children}
    deleted = []
    for job in jobs:
        key = _key({"kind": "Job", **job})
        job_status = job.get("status", {})
        # Keep an old Job while it still runs: its pods write into the shared cache.
        if key not in wanted and not job_status.get("active"):
            await client.delete("batch/v1", "Job", namespace, job["metadata"]["name"])
            deleted.append(key)
    # Without KEDA there is no ScaledObject to remove (and no API to ask).
    if keda_installed:
        selector = {render.DEPLOYMENT_LABEL: name, render.MANAGED_BY_LABEL: render.MANAGED_BY}
        for scaled in await client.list("keda.sh/v1alpha1", "ScaledObject", namespace, selector):
            key = _key({"kind": "ScaledObject", **scaled})
            if key not in wanted and await client.delete(
                "keda.sh/v1alpha1", "ScaledObject", namespace, scaled["metadata"]["name"]
            ):
                deleted.append(key)
    return deleted


def _cache_condition(
    job: Mapping[str, Any] | None, reports: FetchReports, generation: int | None
) -> dict[str, Any]:
    status = (job or {}).get("status", {})
    for cond in status.get("conditions", []):
        if cond.get("type") == "Complete" and cond.get("status") == "True":
            return make_condition(
                "ModelCached", True, "Loaded", "every model is in the cache", generation
            )
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            message = cond.get("message") or "the loader Job failed; see its pod logs"
            if reports.error:
                message = f"{message}: {reports.error}"
            return make_condition("ModelCached", False, "LoadFailed", message, generation)
    if status.get("succeeded"):
        return make_condition(
            "ModelCached", True, "Loaded", "every model is in the cache", generation
        )
    if reports.error:
        message = f"the loader Job's last try failed and is retried with backoff: {reports.error}"
        return make_condition("ModelCached", False, "LoadRetrying", message, generation)
    return make_condition(
        "ModelCached", False, "Loading", "the loader Job is downloading the models", generation
    )


def pending_for(pvc: Mapping[str, Any] | None, now: datetime.datetime) -> float | None:
    """Seconds a PVC has been Pending since its creation; None unless it is Pending."""
    if pvc is None or (pvc.get("status") or {}).get("phase") != "Pending":
        return None
    created = pvc.get("metadata", {}).get("creationTimestamp")
    if not created:
        return None
    since = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    return (now - since).total_seconds()


def _volume_pending_condition(
    target: render.Target, pvc: Mapping[str, Any], seconds: float, generation: int | None
) -> dict[str, Any]:
    cache = target.spec.cache
    storage_class = (pvc.get("spec") or {}).get("storageClassName") or cache.storage_class_name
    message = (
        f"the cache volume {render.cache_claim_name(target.name)} has been Pending for "
        f"{seconds:.0f} s: StorageClass {storage_class or '(the default)'} may not offer "
        f"{cache.access_mode} (the big clouds' default classes offer ReadWriteOnce only). Name "
        "a ReadWriteMany class (EFS, Filestore, Azure Files) in spec.cache.storageClassName, "
        "or set spec.cache.accessMode: ReadWriteOnce (a volume per Ray pod); "
        "see `kubectl describe pvc` for the provisioner's events"
    )
    return make_condition("ModelCached", False, "CacheVolumePending", message, generation)


def _pod_cache_condition(
    serving: Mapping[str, Any], reports: FetchReports, generation: int | None
) -> dict[str, Any]:
    """ModelCached with a volume per Ray pod: each pod's init container fills its own cache."""
    if serving["status"] == "True":
        return make_condition(
            "ModelCached", True, "Loaded", "every Ray pod fetched its models", generation
        )
    if reports.error:
        message = (
            f"a Ray pod could not fetch its models (init container {render.FETCH_CONTAINER}, "
            f"retried with backoff): {reports.error}"
        )
        return make_condition("ModelCached", False, "FetchFailed", message, generation)
    message = (
        "each Ray pod fetches its models into its own volume before Ray starts "
        "(init container fetch-models; see its logs)"
    )
    if serving["reason"] == "ServeFailed":
        return make_condition("ModelCached", None, "Unknown", message, generation)
    return make_condition("ModelCached", False, "Fetching", message, generation)


def _serving(
    rayservice: Mapping[str, Any] | None, deployments: Mapping[str, str], generation: int | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """ServingReady and per-model states from KubeRay's RayService status."""
    status = (rayservice or {}).get("status", {})
    app = status.get("activeServiceStatus", {}).get("applicationStatuses", {}).get(APPLICATION, {})
    by_deployment = app.get("serveDeploymentStatuses", {})
    models = []
    for model, deployment in deployments.items():
        serve = by_deployment.get(deployment, {})
        state = {"HEALTHY": "Ready", "UPDATING": "Loading", "UNHEALTHY": "Failed"}.get(
            serve.get("status", ""), "Pending"
        )
        models.append({"name": model, "state": state, "message": serve.get("message", "")})
    ready_cond = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
    app_status = app.get("status", "")
    if app_status == "RUNNING" and (ready_cond is None or ready_cond.get("status") == "True"):
        cond = make_condition(
            "ServingReady", True, "Running", "the graph serves requests", generation
        )
    elif app_status in {"DEPLOY_FAILED", "UNHEALTHY"}:
        message = app.get("message") or f"Serve application is {app_status}"
        cond = make_condition("ServingReady", False, "ServeFailed", message[:1000], generation)
    else:
        message = f"Serve application is {app_status or 'not deployed yet'}"
        cond = make_condition("ServingReady", False, "Deploying", message, generation)
    return cond, models


def _autoscaling(
    enabled: bool,
    keda: bool,
    scaled: Mapping[str, Mapping[str, Any] | None],
    generation: int | None,
) -> dict[str, Any]:
    """AutoscalingReady from each model's ScaledObject (``scaled``, by model name)."""
    if not enabled:
        return make_condition(
            "AutoscalingReady", True, "Disabled", "replicas are set by hand", generation
        )
    if not keda:
        return make_condition(
            "AutoscalingReady",
            False,
            "KEDAMissing",
            f"KEDA is not installed (no CRD {SCALEDOBJECT_CRD}); install KEDA or set "
            "spec.autoscaling.enabled=false",
            generation,
        )
    for model, obj in scaled.items():
        found = [
            c
            for c in (obj or {}).get("status", {}).get("conditions", [])
            if c.get("type") == "Ready"
        ]
        if not found:
            message = f"KEDA has not reported on model {model} yet"
            return make_condition("AutoscalingReady", False, "Pending", message, generation)
        if found[0].get("status") != "True":
            reason = found[0].get("reason") or "NotReady"
            message = f"model {model}: {found[0].get('message', '')}"
            return make_condition("AutoscalingReady", False, reason, message, generation)
    return make_condition("AutoscalingReady", True, "Active", "KEDA scales every model", generation)


async def reconcile(
    client: KubeClient,
    body: Mapping[str, Any],
    defaults: render.RenderDefaults,
    say: Say,
) -> Outcome:
    """One pass over one LLMDeployment.

    Raises:
        render.RenderError: the spec is invalid (nothing was applied).
        KubeError: an API call failed (retry later).
    """
    meta = body.get("metadata", {})
    name, namespace = meta["name"], meta.get("namespace") or "default"
    generation = meta.get("generation")
    previous = body.get("status", {}) or {}
    old_conditions = previous.get("conditions", [])
    # Validate before touching anything: an invalid spec creates nothing (rendering, below,
    # comes before the first write too).
    target = render.parse_manifest(body)
    graph = render.graph_config(target)
    base = {
        "observedGeneration": generation,
        "selector": render.worker_selector(name, target.spec.models[0].name),
        "modelsSummary": ",".join(m.name for m in target.spec.models),
        "endpoints": {"http": render.http_endpoint(name, namespace)},
    }
    if not await client.api_installed(*PREREQUISITES[RAYSERVICE_CRD]):
        message = (
            f"KubeRay is not installed (no CRD {RAYSERVICE_CRD}); install the KubeRay operator"
        )
        conditions = [
            make_condition("ModelCached", None, "Waiting", message, generation),
            make_condition("ServingReady", False, "KubeRayMissing", message, generation),
            make_condition("AutoscalingReady", None, "Waiting", message, generation),
            make_condition("Ready", False, "KubeRayMissing", message, generation),
        ]
        status = {
            **base,
            "ready": "False",
            "conditions": stamp_transitions(conditions, old_conditions),
        }
        return Outcome(status=status, ready=False, desired_replicas=target.spec.replicas)
    keda = await client.api_installed(*PREREQUISITES[SCALEDOBJECT_CRD])
    monitors = await client.api_installed(*PREREQUISITES[PODMONITOR_CRD])
    skipped = {
        kind for kind, present in (("ScaledObject", keda), ("PodMonitor", monitors)) if not present
    }

    secret_name = target.spec.cache.credentials_secret
    secret_version, secret_missing = await credentials_version(client, namespace, secret_name)

    live_llm_models = await live_models(client, namespace, name)
    counts = model_counts(target, live_llm_models)

    def rendered(active: str | None) -> list[dict[str, Any]]:
        state = render.Observed(
            active_cluster=active, secret_version=secret_version, model_replicas=counts
        )
        everything = render.render_target(target, defaults, graph, state)
        return [c for c in everything if c["kind"] not in skipped]

    everything = rendered(None)
    models_rendered = [c for c in everything if c["kind"] == MODEL_KIND]
    applied = [c for c in everything if c["kind"] != MODEL_KIND]
    llm_models, created, patched, deleted = await sync_models(
        client, target, models_rendered, live_llm_models, counts
    )

    def rendered_children(active: str | None) -> list[dict[str, Any]]:
        return [c for c in rendered(active) if c["kind"] != MODEL_KIND]

    observed, *changes = await converge(
        client, applied, namespace, name, keda, say, rendered_children
    )
    for done, more in zip((created, patched, deleted), changes, strict=True):
        done += more
    active = active_cluster(observed.get(f"RayService/{name}"))
    rayservice = next(c for c in applied if c["kind"] == "RayService")
    live = await client.get("ray.io/v1", "RayCluster", namespace, active) if active else None
    recreate = target.spec.rollout.strategy == "Recreate"
    if live is not None and recreate and stale_cluster(live, rayservice):
        # KubeRay's upgradeStrategy None makes no new cluster for a changed spec; with the
        # active one gone it creates one from the RayService's current spec.
        await client.delete("ray.io/v1", "RayCluster", namespace, live["metadata"]["name"])
        deleted.append(f"RayCluster/{active}")
        say(
            "warning",
            "Recreating",
            f"rollout Recreate: deleted RayCluster {active}, whose pods were of an older spec; "
            "KubeRay starts a new one (no serving until its models load)",
        )
        live = None
    if live is not None and await sync_worker_bounds(client, live, rayservice):
        patched.append(f"RayCluster/{active}")

    deployments = {llm.name: llm.deployment_name for llm in graph.llms}
    serving, models = _serving(observed.get(f"RayService/{name}"), deployments, generation)
    pods = await worker_pods(client, namespace, active)
    fetched = render.sources(target.spec)
    recorded = {
        str(e.get("source")) for e in previous.get("sources") or [] if isinstance(e, Mapping)
    }
    if render.shared_cache(target.spec):
        state = render.Observed(secret_version=secret_version)
        job = observed.get(f"Job/{render.loader_job_name(target, state)}")
        reports = await loader_reports(client, namespace, job, fetched, recorded)
        cache = _cache_condition(job, reports, generation)
        pvc = observed.get(f"PersistentVolumeClaim/{render.cache_claim_name(name)}")
        pending = pending_for(pvc, datetime.datetime.now(datetime.UTC))
        if pvc is not None and pending is not None and pending > PVC_PENDING_GRACE_S:
            cache = _volume_pending_condition(target, pvc, pending, generation)
    else:
        reports = FetchReports()
        for pod in pods:
            reports.add(pod, render.FETCH_CONTAINER)
        cache = _pod_cache_condition(serving, reports, generation)
    if secret_missing and cache["status"] != "True":
        message = (
            f"Secret {secret_name} (spec.cache.credentialsSecret) does not exist in namespace "
            f"{namespace}: the model download cannot authenticate; create it with the source's "
            "credentials (HF_TOKEN for gated Hugging Face repos)"
        )
        cache = make_condition("ModelCached", False, "CredentialsMissing", message, generation)
    scaled = {
        m.name: observed.get(f"ScaledObject/{render.model_object_name(name, m.name)}")
        for m in target.spec.models
    }
    autoscaling = _autoscaling(target.spec.autoscaling.enabled, keda, scaled, generation)
    parts = [cache, serving, autoscaling]
    ready = all(c["status"] == "True" for c in parts)
    not_ready = [c for c in parts if c["status"] != "True"]
    if ready:
        overall = make_condition(
            "Ready", True, "Ready", "serving at the desired replicas", generation
        )
    else:
        # A known failure explains more than a part that cannot tell yet.
        first = next((c for c in not_ready if c["status"] == "False"), not_ready[0])
        overall = make_condition("Ready", False, first["reason"], first["message"], generation)
    conditions = stamp_transitions([cache, serving, autoscaling, overall], old_conditions)
    _announce(conditions, old_conditions, say)
    workers = ready_workers(pods)
    for model in models:
        model["replicas"] = workers[model["name"]] if model["state"] == "Ready" else 0
        model["readyReplicas"] = model["replicas"]
        model["desiredReplicas"] = counts[model["name"]]
    replicas = min((model["replicas"] for model in models), default=0)
    await report_models(client, target, llm_models, {m["name"]: m["readyReplicas"] for m in models})
    source_entries, differ = reports.sources_status(fetched, previous.get("sources") or [])
    if source_entries != (previous.get("sources") or []):
        for warning in differ:
            say("warning", "SourceRevisionsDiffer", warning)
    status = {
        **base,
        "replicas": replicas,
        "replicasSummary": ", ".join(
            f"{m['name']} {m['readyReplicas']}/{m['desiredReplicas']}" for m in models
        ),
        "ready": overall["status"],
        "conditions": conditions,
        "models": models,
        "sources": source_entries,
    }
    if not monitors and f"RayService/{name}" in created:
        say(
            "warning",
            "PrometheusOperatorMissing",
            f"Prometheus Operator is not installed (no CRD {PODMONITOR_CRD}): no PodMonitor",
        )
    per_model = {m["name"]: (m["desiredReplicas"], m["readyReplicas"]) for m in models}
    # Like status.replicas (the fewest ready over models): the fewest asked for, so a model
    # scaled to zero on purpose is not "below desired".
    desired = min(counts.values(), default=0)
    return Outcome(status, ready, desired, per_model, created, patched, deleted)


def _announce(
    conditions: list[dict[str, Any]], previous: list[Mapping[str, Any]], say: Say
) -> None:
    """Posts an Event for each condition whose status changed."""
    before = {c.get("type"): c.get("status") for c in previous}
    for cond in conditions:
        if before.get(cond["type"]) != cond["status"]:
            level = "info" if cond["status"] == "True" else "warning"
            say(level, cond["reason"], f"{cond['type']}={cond['status']}: {cond['message']}")

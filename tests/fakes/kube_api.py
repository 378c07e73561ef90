"""KMock's Kubernetes emulator, extended with the API-server semantics the operator relies on.

The stock emulator stores JSON as sent. This subclass adds what a real API server does and the
operator depends on: metadata.uid / resourceVersion / generation / creationTimestamp on create,
generation bumps on spec changes, the status and scale subresources (a main-resource write
cannot change status; /status writes only status; /scale writes spec.replicas), and garbage
collection of children by owner reference uid, and label selectors on lists. Server-side apply
(`PATCH` as ``application/apply-patch+yaml``) works as the operator relies on it: managedFields
per field manager and operation, create when absent, fields the applier alone owned and no
longer applies are removed, a field another manager owns with a different value is a 409
naming that manager unless ``force=true`` (lists are atomic, as in CRDs without list-type
markers); merge patches and creates record their manager's fields too. Reads and writes
find an object by its key rather than by scanning the store, so thousands of objects stay fast
(the operator benchmark runs 1,000 LLMDeployments). Objects are validated separately
(tests/schemas.py).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp.web
import attrs
import yaml
from kmock import KubernetesEmulator
from kmock._internal import enums, k8s, k8s_dicts, rendering

from tests.fakes import kube_rules


@attrs.frozen
class UnprocessableError(k8s.KubernetesError):
    """HTTP 422, as the API server answers a JSON patch whose test failed."""

    status: int = 422
    reason: str = "Invalid"
    message: str = "the patch could not be applied"


@attrs.frozen
class ApplyConflictError(k8s.KubernetesError):
    """HTTP 409 of a server-side apply: fields owned by other managers hold other values."""

    status: int = 409
    reason: str = "Conflict"
    message: str = "Apply failed with conflicts"


@attrs.frozen
class NotFoundError(k8s.KubernetesError):
    """HTTP 404 for a missing object, with the reason a real API server gives."""

    status: int = 404
    reason: str = "NotFound"
    message: str = "not found"


APPLY_PATCH = "application/apply-patch+yaml"
# Metadata that identifies or versions an object: nobody owns it as a field.
UNOWNED_METADATA = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
    "selfLink",
}
_MISSING = object()

Path = tuple[str, ...]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _leaves(value: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Field paths an object sets -> values. A list is one (atomic) field, and so is an empty
    map; a None in a merge patch is a field it removes."""
    found: dict[Path, Any] = {}
    for key, item in value.items():
        path = (*prefix, key)
        if isinstance(item, Mapping) and item:
            found.update(_leaves(item, path))
        else:
            found[path] = item
    return found


def owned_fields(obj: Mapping[str, Any]) -> dict[Path, Any]:
    """The fields a write of ``obj`` sets: not identity or versions, not status."""
    body = {k: v for k, v in obj.items() if k not in {"apiVersion", "kind", "status"}}
    meta = {k: v for k, v in (body.pop("metadata", None) or {}).items()}
    meta = {k: v for k, v in meta.items() if k not in UNOWNED_METADATA}
    if meta:
        body["metadata"] = meta
    return _leaves(body)


def _get(obj: Any, path: Path) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _set(obj: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(obj.get(key), dict):
            obj[key] = {}
        obj = obj[key]
    obj[path[-1]] = copy.deepcopy(value)


def _remove(obj: dict[str, Any], path: Path) -> None:
    """Removes a field, and the maps it leaves empty."""
    parents = [obj]
    for key in path[:-1]:
        child = parents[-1].get(key)
        if not isinstance(child, dict):
            return
        parents.append(child)
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):
        if parents[depth]:
            break
        parents[depth - 1].pop(path[depth - 1], None)


def _overlaps(path: Path, paths: Iterable[Path]) -> list[Path]:
    """Paths equal to ``path``, inside it, or containing it."""
    return [p for p in paths if p[: len(path)] == path or path[: len(p)] == p]


def fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    """A set of field paths in the API server's FieldsV1 form (``{"f:spec": {"f:x": {}}}``)."""
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def paths_of(tree: Mapping[str, Any], prefix: Path = ()) -> set[Path]:
    """The field paths of a FieldsV1 tree (its leaves)."""
    found: set[Path] = set()
    for key, node in tree.items():
        if not key.startswith("f:"):
            continue
        path = (*prefix, key[2:])
        found |= paths_of(node, path) if node else {path}
    return found


def managers(obj: Mapping[str, Any]) -> dict[tuple[str, str], set[Path]]:
    """(manager, operation) -> the field paths it owns, from metadata.managedFields."""
    return {
        (entry["manager"], entry["operation"]): paths_of(entry.get("fieldsV1") or {})
        for entry in obj.get("metadata", {}).get("managedFields") or []
    }


def _managed_fields(
    current: Mapping[str, Any],
    owners: Mapping[tuple[str, str], set[Path]],
    api_version: str,
    touched: tuple[str, str],
) -> list[dict[str, Any]]:
    times = {
        (entry["manager"], entry["operation"]): entry.get("time")
        for entry in current.get("metadata", {}).get("managedFields") or []
    }
    return [
        {
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": _now() if (manager, operation) == touched else times.get(key) or _now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(sorted(paths)),
        }
        for key in owners
        for manager, operation in [key]
        for paths in [owners[key]]
        if paths
    ]


def _without_times(obj: Mapping[str, Any]) -> Any:
    """An object less its managedFields' timestamps (a no-op apply must compare equal)."""
    clean = copy.deepcopy(dict(obj))
    for entry in clean.get("metadata", {}).get("managedFields") or []:
        entry.pop("time", None)
    return clean


def manager_of(request: rendering.Request) -> str:
    """The field manager of a write: ?fieldManager=, else the User-Agent's program name."""
    named = request.params.get("fieldManager")
    if named:
        return str(named)
    agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
    return agent.split("/", 1)[0] or "unknown"


def content_type(request: rendering.Request) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")


def record_update(
    current: Mapping[str, Any], written: Mapping[str, Any], manager: str, api_version: str
) -> list[dict[str, Any]]:
    """managedFields after a non-apply write (create, merge patch) of ``written`` by
    ``manager``: it owns the fields whose values it changed, and nobody else does any more."""
    owners = managers(current)
    changed = {
        path
        for path, value in owned_fields(written).items()
        if value is None or _get(current, path) != value
    }
    for key in owners:
        owners[key] -= {p for c in changed for p in _overlaps(c, owners[key])}
    mine = owners.setdefault((manager, "Update"), set())
    mine |= {path for path in changed if _get(written, path) is not None}
    return _managed_fields(current, owners, api_version, (manager, "Update"))


# GET of one namespace: the stock emulator reads the name as a namespace prefix.
NAMESPACE_PATH = re.compile(r"/api/v1/namespaces/([a-z0-9-]+)")

LLMDEPLOYMENTS = "llmops.dev/v1alpha1/llmdeployments"
LLMMODELS = "llmops.dev/v1alpha1/llmmodels"

# Every resource the operator reads or writes, as discovery reports it.
RESOURCES: dict[str, dict[str, Any]] = {
    LLMDEPLOYMENTS: {
        "kind": "LLMDeployment",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
        "subresources": ["status", "scale"],
    },
    LLMMODELS: {
        "kind": "LLMModel",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
        "subresources": ["status", "scale"],
    },
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition",
        "namespaced": False,
        "verbs": ["get", "list", "watch"],
    },
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "verbs": ["get", "list", "watch"]},
    "v1/events": {"kind": "Event", "namespaced": True, "verbs": ["create"]},
    # What `llmops keys --secret` edits with kubectl (the operator never reads Secrets).
    "v1/secrets": {
        "kind": "Secret",
        "singular": "secret",
        "namespaced": True,
        "verbs": ["get", "list", "create", "update"],
    },
    "v1/persistentvolumeclaims": {
        "kind": "PersistentVolumeClaim",
        "namespaced": True,
        "verbs": ["get", "list", "create", "patch", "delete"],
        "subresources": ["status"],
    },
    "v1/services": {
        "kind": "Service",
        "namespaced": True,
        "verbs": ["get", "list", "create", "patch", "delete"],
    },
    "networking.k8s.io/v1/networkpolicies": {
        "kind": "NetworkPolicy",
        "namespaced": True,
        "verbs": ["get", "list", "create", "patch", "delete"],
    },
    "batch/v1/jobs": {
        "kind": "Job",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        "subresources": ["status"],
    },
    "ray.io/v1/rayservices": {
        "kind": "RayService",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        "subresources": ["status"],
    },
    "ray.io/v1/rayclusters": {
        "kind": "RayCluster",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        "subresources": ["status"],
    },
    "v1/pods": {"kind": "Pod", "namespaced": True, "verbs": ["get", "list", "create", "patch"]},
    "keda.sh/v1alpha1/scaledobjects": {
        "kind": "ScaledObject",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        "subresources": ["status"],
    },
    "monitoring.coreos.com/v1/podmonitors": {
        "kind": "PodMonitor",
        "namespaced": True,
        "verbs": ["get", "list", "create", "patch", "delete"],
    },
}
PREREQUISITE_CRDS = {
    "rayservices.ray.io": "ray.io/v1/rayservices",
    "rayclusters.ray.io": "ray.io/v1/rayclusters",
    "scaledobjects.keda.sh": "keda.sh/v1alpha1/scaledobjects",
    "podmonitors.monitoring.coreos.com": "monitoring.coreos.com/v1/podmonitors",
}


class KubeAPI(KubernetesEmulator):
    """KubernetesEmulator plus metadata, subresources and owner-reference GC."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        # Object keys by (resource, namespace), for lists; grows with the store (see _index).
        self._by_collection: dict[tuple[Any, str | None], set[tuple[Any, str | None, str]]] = {}
        self._indexed = 0
        installed_later = set(PREREQUISITE_CRDS.values())
        for resource, info in RESOURCES.items():
            if resource not in installed_later:
                self.resources[resource] = info
        # Watches resume from a resourceVersion, or answer 410 Gone (tests/fakes/kube_rules.py).
        self.watch_cache = kube_rules.WatchCache(lambda: str(next(self._versions)))
        self._buses = kube_rules.RecordingBuses(self.watch_cache)
        self.cel_rules = True  # False: an older CRD, without x-kubernetes-validations

    def _serve_watch(self, request: rendering.Request) -> Any:
        return kube_rules.watch(self, request)

    def install_crds(self, *names: str) -> None:
        """Installs prerequisite CRDs (KubeRay, KEDA, Prometheus Operator): served from now on."""
        names = names or tuple(PREREQUISITE_CRDS)
        if "rayservices.ray.io" in names:  # KubeRay's chart installs its CRDs together
            names = (*names, "rayclusters.ray.io")
        for name in names:
            self.resources[PREREQUISITE_CRDS[name]] = RESOURCES[PREREQUISITE_CRDS[name]]
            group_version, plural = PREREQUISITE_CRDS[name].rsplit("/", 1)
            group, version = group_version.split("/")
            self.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, name] = {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": name, "uid": str(uuid.uuid4())},
                "spec": {
                    "group": group,
                    "scope": "Namespaced",
                    "names": {"plural": plural, "kind": RESOURCES[PREREQUISITE_CRDS[name]]["kind"]},
                    "versions": [{"name": version, "served": True, "storage": True}],
                },
            }

    def _stored(
        self, request: rendering.Request, name: str | None = None, namespace: str | None = None
    ) -> k8s_dicts.Object | None:
        """The stored object a request addresses (deleted ones included), by key."""
        key = (request.resource, namespace or request.namespace, name or request.name)
        return self._objects[key] if key in self._objects else None  # noqa: SIM401 (no .get)

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        obj = self._stored(request)
        return None if obj is None or obj.deleted else dict(obj.raw)

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        async with self._lock:
            obj = self._stored(request)
        if obj is None or obj.deleted:
            plural = request.resource.plural if request.resource else "object"
            raise NotFoundError(message=f'{plural} "{request.name}" not found')
        return obj.raw

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        meta = request.data.get("metadata", {})
        async with self._lock:
            obj = self._stored(request, meta.get("name"), meta.get("namespace"))
        assert obj is not None  # stored by the base class's _handle before this runs
        return obj.raw

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        async with self._lock:
            obj = self._stored(request)
        assert obj is not None
        return obj.last.raw

    _serve_delete = _serve_update

    def _index(self) -> None:
        """Adds keys stored since the last call (the store only grows, keys in order)."""
        store = self._objects._objects  # the plain dict under the view: C-speed keys
        if len(store) == self._indexed:
            return
        if len(store) < self._indexed:  # something was hard-deleted: start over
            self._by_collection.clear()
            self._indexed = 0
        for key in list(store)[self._indexed :]:
            resource, namespace, _ = key
            self._by_collection.setdefault((resource, namespace), set()).add(key)
            self._by_collection.setdefault((resource, None), set()).add(key)
        self._indexed = len(store)

    def alive(self, resource: str, namespace: str | None) -> dict[str, dict[str, Any]]:
        """Objects of one resource ("group/version/plural" or "v1/plural") in one namespace
        that exist now, by name; looked up in the index, not by scanning the store."""
        group_version, plural = resource.rsplit("/", 1)
        group, _, version = group_version.rpartition("/")
        self._index()
        store = self._objects._objects
        found = {}
        for (res, ns), keys in list(self._by_collection.items()):
            if ns != namespace or res.plural != plural:
                continue
            if (res.group or "") != group or (res.version or "") != version:
                continue
            for key in list(keys):
                obj = store.get(key)
                if obj is not None and key[1] == namespace and not obj.deleted:
                    found[key[2]] = obj.raw
        return found

    def _get_resources(self) -> list[Any]:
        self._index()
        declared = set(k8s.KubernetesScaffold._get_resources(self))
        return list(declared | {resource for resource, _ in self._by_collection})

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if request.resource not in self._get_resources():
            raise k8s.KubernetesResourceNotFoundError()
        wanted = dict(
            term.split("=", 1)
            for term in request.params.get("labelSelector", "").split(",")
            if "=" in term
        )
        store = self._objects._objects
        async with self._lock:
            collection = self._by_collection.get((request.resource, request.namespace), set())
            alive = (store[key] for key in collection if key in store)
            raws = (obj.raw for obj in alive if not obj.deleted)
            items = [
                raw
                for raw in raws
                if all(
                    raw.get("metadata", {}).get("labels", {}).get(k) == v for k, v in wanted.items()
                )
            ]
        return {"metadata": {"resourceVersion": str(next(self._versions))}, "items": items}

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        # The core group's list names its groupVersion "v1" (kubectl maps kinds by it).
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        return payload

    async def _replace(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """PUT of a whole object (`kubectl replace`): only over the version it was read at."""
        data: dict[str, Any] = request.data
        async with self._lock:
            obj = self._stored(request)
            if obj is None or obj.deleted:
                raise k8s.KubernetesObjectNotFoundError()
            current = obj.raw.get("metadata", {})
            sent = data.get("metadata", {}).get("resourceVersion")
            meta = data.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp", "generation", "managedFields"):
                if kept in current:
                    meta[kept] = current[kept]
            data = kube_rules.admitted(self, request, dict(obj.raw), data, sent)
            meta = data["metadata"]
            meta["resourceVersion"] = str(next(self._versions))
            obj.create(data)  # a new whole version, not a merge into the last one
        assert request.resource is not None
        await self._buses[request.resource].put({"type": "MODIFIED", "object": data})
        return aiohttp.web.json_response(data)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        request = kube_rules.as_watch(self, request)  # ?watch=True, as Python clients send
        namespace = NAMESPACE_PATH.fullmatch(request.url.path)
        if namespace and request.method == enums.method.GET:
            # Every namespace exists here (objects may be stored in any of them).
            name = namespace.group(1)
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
        if request.subresource == "scale" and request.resource is not None and request.name:
            return await kube_rules.serve_scale(self, request)  # answers Scale objects
        if (
            request.method == enums.method.PUT
            and request.resource is not None
            and request.name is not None
            and isinstance(request.data, dict)
        ):
            return await self._replace(request)
        if (
            request.method == enums.method.PATCH
            and request.resource is not None
            and request.name is not None
            and content_type(request).startswith(APPLY_PATCH)
        ):
            return await self._server_side_apply(request)
        if request.resource is not None and isinstance(request.data, dict):
            sent = kube_rules.sent_version(request.data)
            self._apply_server_semantics(request)
            kube_rules.admit_merge_patch(self, request, sent)  # 409/422 as the API server
        elif request.resource is not None and isinstance(request.data, list):
            self._check_json_patch(request)
        response = await super()._handle(request)
        if (
            request.resource is not None
            and request.action in {enums.action.DELETE, enums.action.UPDATE}
            and request.name is not None
            and response.status < 300
            and ((obj := self._stored(request)) is None or obj.deleted)
        ):
            await self._collect_garbage()
        return response

    def _apply_server_semantics(self, request: rendering.Request) -> None:
        data: dict[str, Any] = request.data
        declared = self.resources[request.resource].subresources if request.resource else set()
        if request.action == enums.action.CREATE:
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["resourceVersion"] = str(next(self._versions))
            meta["generation"] = 1
            meta.setdefault("creationTimestamp", _now())
            if "status" in declared:
                data.pop("status", None)
            meta["managedFields"] = record_update(
                {}, data, manager_of(request), data.get("apiVersion", "")
            )
        elif request.action == enums.action.UPDATE and request.name is not None:
            current = self._current(request) or {}
            if request.subresource == "status":
                for key in [k for k in data if k != "status"]:
                    del data[key]
            else:
                if "status" in declared:
                    data.pop("status", None)
                data.setdefault("metadata", {})["managedFields"] = record_update(
                    current, data, manager_of(request), current.get("apiVersion", "")
                )
            patch_meta = data.setdefault("metadata", {})
            patch_meta["resourceVersion"] = str(next(self._versions))
            old_spec = current.get("spec", {})
            if "spec" in data and any(old_spec.get(k) != v for k, v in data["spec"].items()):
                patch_meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1

    async def _server_side_apply(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """PATCH as application/apply-patch+yaml: create or update the fields one manager owns.

        As the API server's field manager does (k8s.io/apimachinery/pkg/util/managedfields):
        the applier owns exactly the fields of its latest apply; fields it alone owned and
        left out are removed; a field another manager owns with a different value is a
        conflict (409, details.causes naming the manager) unless ``force=true``, which moves
        the field to the applier. A no-op apply changes nothing, not even resourceVersion.
        """
        assert request.resource is not None
        assert request.name is not None
        if request.resource not in k8s.KubernetesScaffold._get_resources(self):
            raise k8s.KubernetesResourceNotFoundError()
        applied = request.data if isinstance(request.data, dict) else yaml.safe_load(request.text)
        if not isinstance(applied, dict) or applied.get("metadata", {}).get("name") != request.name:
            raise UnprocessableError(message="the applied object must name the object patched")
        manager = request.params.get("fieldManager")
        if not manager:
            raise UnprocessableError(message="fieldManager is required for apply patch")
        force = request.params.get("force") == "true"
        declared = self.resources[request.resource].subresources
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            obj = self._stored(request)
            exists = obj is not None and not obj.deleted
            current: dict[str, Any] = copy.deepcopy(dict(obj.raw)) if exists and obj else {}
            fields = owned_fields(applied)
            owners = managers(current)
            mine = (manager, "Apply")
            conflicts = [
                (other, path)
                for other, paths in owners.items()
                if other != mine
                for path, value in fields.items()
                if _overlaps(path, paths) and _get(current, path) != value
            ]
            if conflicts and not force:
                raise self._conflict(conflicts, applied.get("apiVersion", ""))
            for other, path in conflicts:
                owners[other] -= set(_overlaps(path, owners[other]))
            result = copy.deepcopy(current) if exists else {}
            others = set().union(*(p for k, p in owners.items() if k != mine))
            for gone in owners.get(mine, set()) - set(fields):
                if not _overlaps(gone, others) and not _overlaps(gone, fields):
                    _remove(result, gone)
            for path, value in fields.items():
                _set(result, path, value)
            owners[mine] = set(fields)
            result["apiVersion"] = applied.get("apiVersion", current.get("apiVersion"))
            result["kind"] = applied.get("kind", current.get("kind"))
            meta = result.setdefault("metadata", {})
            meta["name"] = request.name
            if request.namespace:
                meta["namespace"] = request.namespace
            if not exists:
                meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now())
                if "status" in declared:
                    result.pop("status", None)
            meta["managedFields"] = _managed_fields(current, owners, result["apiVersion"], mine)
            unchanged = exists and _without_times(result) == _without_times(current)
            if unchanged:
                return aiohttp.web.json_response(current)
            meta["resourceVersion"] = str(next(self._versions))
            if exists and result.get("spec") != current.get("spec"):
                meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1
            sent = kube_rules.sent_version(applied)
            result = kube_rules.admitted(self, request, current if exists else None, result, sent)
            if obj is None:
                self._objects[key] = result
            else:
                obj.create(result)
        event = "MODIFIED" if exists else "ADDED"
        await self._buses[request.resource].put({"type": event, "object": result})
        return aiohttp.web.json_response(result, status=200 if exists else 201)

    @staticmethod
    def _conflict(conflicts: list[tuple[tuple[str, str], Path]], api_version: str) -> Exception:
        causes = [
            {
                "reason": "FieldManagerConflict",
                "message": f'conflict with "{manager}" using {api_version}',
                "field": "." + ".".join(path),
            }
            for (manager, _), path in conflicts
        ]
        listed = "\n".join(f"- {c['message']}: {c['field']}" for c in causes)
        return ApplyConflictError(
            message=f"Apply failed with {len(causes)} conflicts:\n{listed}",
            details={"causes": causes},
        )

    def _check_json_patch(self, request: rendering.Request) -> None:
        """JSON patches: a failed ``test`` is 422 (a conflict); a success bumps the version."""
        current = self._current(request) or {}
        for op in request.data:
            if op.get("op") == "test":
                value: Any = current
                for part in op["path"].strip("/").split("/"):
                    part = part.replace("~1", "/").replace("~0", "~")
                    if isinstance(value, list) and part.isdigit() and int(part) < len(value):
                        value = value[int(part)]
                    else:
                        value = value.get(part) if isinstance(value, dict) else None
                if value != op.get("value"):
                    raise UnprocessableError(message=f"test failed at {op['path']}")
        request.data.append(
            {"op": "add", "path": "/metadata/resourceVersion", "value": str(next(self._versions))}
        )

    async def _collect_garbage(self) -> None:
        """Deletes objects whose owners are all gone (background propagation)."""
        while True:
            async with self._lock:
                alive = {
                    obj.get("metadata", {}).get("uid")
                    for obj in self._objects.values()
                    if not obj.deleted
                }
                orphans = [
                    (key, obj)
                    for key, obj in self._objects.items()
                    if not obj.deleted
                    and (owners := obj.get("metadata", {}).get("ownerReferences"))
                    and not any(o.get("uid") in alive for o in owners)
                ]
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
            if not orphans:
                return

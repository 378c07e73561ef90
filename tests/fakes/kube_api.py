"""KMock's Kubernetes emulator, extended with the API-server semantics the operator relies on.

The stock emulator stores JSON as sent. This subclass adds what a real API server does and the
operator depends on: metadata.uid / resourceVersion / generation / creationTimestamp on create,
generation bumps on spec changes, the status and scale subresources (a main-resource write
cannot change status; /status writes only status; /scale writes spec.replicas), and garbage
collection of children by owner reference uid, and label selectors on lists. Reads and writes
find an object by its key rather than by scanning the store, so thousands of objects stay fast
(the operator benchmark runs 1,000 LLMDeployments). Objects are validated separately
(tests/schemas.py).
"""

from __future__ import annotations

import datetime
import itertools
import re
import uuid
from typing import Any

import aiohttp.web
import attrs
from kmock import KubernetesEmulator
from kmock._internal import enums, k8s, k8s_dicts, rendering


@attrs.frozen
class UnprocessableError(k8s.KubernetesError):
    """HTTP 422, as the API server answers a JSON patch whose test failed."""

    status: int = 422
    reason: str = "Invalid"
    message: str = "the patch could not be applied"


@attrs.frozen
class ConflictError(k8s.KubernetesError):
    """HTTP 409, as the API server answers a write of an outdated resourceVersion."""

    status: int = 409
    reason: str = "Conflict"
    message: str = "the object has been modified; apply your changes to the latest version"


@attrs.frozen
class NotFoundError(k8s.KubernetesError):
    """HTTP 404 for a missing object, with the reason a real API server gives."""

    status: int = 404
    reason: str = "NotFound"
    message: str = "not found"


# GET of one namespace: the stock emulator reads the name as a namespace prefix.
NAMESPACE_PATH = re.compile(r"/api/v1/namespaces/([a-z0-9-]+)")

LLMDEPLOYMENTS = "llmops.dev/v1alpha1/llmdeployments"

# Every resource the operator reads or writes, as discovery reports it.
RESOURCES: dict[str, dict[str, Any]] = {
    LLMDEPLOYMENTS: {
        "kind": "LLMDeployment",
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
    },
    "v1/services": {
        "kind": "Service",
        "namespaced": True,
        "verbs": ["get", "list", "create", "patch", "delete"],
    },
    "batch/v1/jobs": {
        "kind": "Job",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    "ray.io/v1/rayservices": {
        "kind": "RayService",
        "namespaced": True,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        "subresources": ["status"],
    },
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

    def install_crds(self, *names: str) -> None:
        """Installs prerequisite CRDs (KubeRay, KEDA, Prometheus Operator): served from now on."""
        for name in names or tuple(PREREQUISITE_CRDS):
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
            if sent is not None and sent != current.get("resourceVersion"):
                raise ConflictError()
            meta = data.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp", "generation"):
                if kept in current:
                    meta[kept] = current[kept]
            meta["resourceVersion"] = str(next(self._versions))
            obj.create(data)  # a new whole version, not a merge into the last one
        assert request.resource is not None
        await self._buses[request.resource].put({"type": "MODIFIED", "object": data})
        return aiohttp.web.json_response(data)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        namespace = NAMESPACE_PATH.fullmatch(request.url.path)
        if namespace and request.method == enums.method.GET:
            # Every namespace exists here (objects may be stored in any of them).
            name = namespace.group(1)
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
        if (
            request.method == enums.method.PUT
            and request.resource is not None
            and request.name is not None
            and isinstance(request.data, dict)
        ):
            return await self._replace(request)
        if request.resource is not None and isinstance(request.data, dict):
            self._apply_server_semantics(request)
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
            meta.setdefault(
                "creationTimestamp",
                datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            if "status" in declared:
                data.pop("status", None)
        elif request.action == enums.action.UPDATE and request.name is not None:
            current = self._current(request) or {}
            if request.subresource == "status":
                for key in [k for k in data if k != "status"]:
                    del data[key]
            elif request.subresource == "scale":
                replicas = data.get("spec", {}).get("replicas")
                data.clear()
                data["spec"] = {"replicas": replicas}
            elif "status" in declared:
                data.pop("status", None)
            patch_meta = data.setdefault("metadata", {})
            patch_meta["resourceVersion"] = str(next(self._versions))
            old_spec = current.get("spec", {})
            if "spec" in data and any(old_spec.get(k) != v for k, v in data["spec"].items()):
                patch_meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1

    def _check_json_patch(self, request: rendering.Request) -> None:
        """JSON patches: a failed ``test`` is 422 (a conflict); a success bumps the version."""
        current = self._current(request) or {}
        for op in request.data:
            if op.get("op") == "test":
                value: Any = current
                for part in op["path"].strip("/").split("/"):
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

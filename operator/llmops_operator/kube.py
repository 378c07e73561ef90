"""The operator's Kubernetes client for its children, on the official asyncio client.

Kopf watches and patches LLMDeployments itself; this client applies, patches, lists and
deletes the objects rendered for them, by (apiVersion, kind), through `kubernetes_asyncio`'s
ApiClient (its connection pool, TLS and authentication; in a pod, its in-cluster loader
re-reads the rotating service-account token). It uses the cluster and credentials Kopf logged
in with (`kopf.ConnectionInfo`), and counts its calls (the benchmark reports API calls per
object).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import incluster_config

from llmops_contract import API_VERSION, KIND, MODEL_KIND, MODEL_PLURAL, PLURAL

USER_AGENT = "llmops-operator"

# Kinds the operator touches: (apiVersion, kind) -> plural.
PLURALS = {
    (API_VERSION, KIND): PLURAL,
    (API_VERSION, MODEL_KIND): MODEL_PLURAL,
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Secret"): "secrets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("batch/v1", "Job"): "jobs",
    ("ray.io/v1", "RayService"): "rayservices",
    ("ray.io/v1", "RayCluster"): "rayclusters",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "customresourcedefinitions",
}
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # a JSON body is valid YAML
FIELD_MANAGER = "llmops-operator"
# Applied objects whose resourceVersion is remembered (to tell a changing apply from a no-op).
MAX_REMEMBERED_VERSIONS = 100_000
# How long an API found in discovery is trusted before asking again. Only presence is cached:
# an install is noticed on the next pass; a removal surfaces as a 404 on the next write.
DISCOVERY_TTL_S = 60.0
REQUEST_TIMEOUT_S = 30.0
# Content negotiation for an object's metadata alone (as the metadata informers of the
# garbage collector ask): the API server answers a meta.k8s.io/v1 PartialObjectMetadata.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


class KubeError(Exception):
    """An API call failed; carries the HTTP status, the server's message and its details."""

    def __init__(self, status: int, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.details: Mapping[str, Any] = details or {}

    @property
    def conflicting_managers(self) -> list[str]:
        """Field managers named by a server-side apply conflict (409), in order, once each.

        The API server names them in details.causes[].message, e.g.
        ``conflict with "kubectl-edit" using ray.io/v1``.
        """
        managers: list[str] = []
        for cause in self.details.get("causes") or []:
            text = str(cause.get("message", ""))
            if text.startswith('conflict with "') and (end := text.find('"', 15)) > 0:
                manager = text[15:end]
                if manager not in managers:
                    managers.append(manager)
        return managers


@dataclass
class Applied:
    """What a server-side apply returned.

    Attributes:
        obj: The object as the API server holds it after the apply (status included).
        created: The apply created it (HTTP 201).
        changed: Created, or its resourceVersion moved since this client's last apply of it
            (a no-op apply leaves resourceVersion as it was).
    """

    obj: dict[str, Any]
    created: bool
    changed: bool


def resource_path(
    api_version: str, kind: str, namespace: str | None, name: str | None = None
) -> str:
    """The REST path of a collection or an object."""
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


def configuration(info: kopf.ConnectionInfo, folder: Path) -> k8s.Configuration:
    """The library's configuration for the server and credentials Kopf logged in with.

    In a pod whose service account Kopf used, the library's in-cluster loader sets the token
    and re-reads it as the kubelet rotates it. Certificates given inline are written to
    ``folder`` (the library reads them from files).
    """
    config = k8s.Configuration()
    token_file = Path(incluster_config.SERVICE_TOKEN_FILENAME)
    in_cluster = (
        info.token is not None
        and "KUBERNETES_SERVICE_HOST" in os.environ
        and token_file.is_file()
        and token_file.read_text().strip() == info.token
    )
    if in_cluster:
        load: Callable[..., None] = incluster_config.load_incluster_config
        load(client_configuration=config, try_refresh_token=True)
    elif info.token:
        config.api_key = {"BearerToken": info.token}
        config.api_key_prefix = {"BearerToken": info.scheme or "Bearer"}
    config.host = info.server.rstrip("/")
    config.verify_ssl = not info.insecure
    if info.ca_path:
        config.ssl_ca_cert = str(info.ca_path)
    if info.ca_data:
        ca = folder / "ca.pem"
        ca.write_bytes(base64.b64decode(info.ca_data))
        config.ssl_ca_cert = str(ca)
    if info.certificate_path and info.private_key_path:
        config.cert_file, config.key_file = str(info.certificate_path), str(info.private_key_path)
    if info.certificate_data and info.private_key_data:
        cert, key = folder / "cert.pem", folder / "key.pem"
        cert.write_bytes(base64.b64decode(info.certificate_data))
        key.write_bytes(base64.b64decode(info.private_key_data))
        config.cert_file, config.key_file = str(cert), str(key)
    config.connection_pool_maxsize = 64
    return config


class KubeClient:
    """Create/get/patch/list/delete by (apiVersion, kind), with call counting.

    Args:
        info: Credentials and server, as Kopf's login handler returned them.
    """

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self.server = info.server.rstrip("/")
        self._files = tempfile.TemporaryDirectory(prefix="llmops-kube-")
        self._api = k8s.ApiClient(configuration(info, Path(self._files.name)))
        # Audit logs (and the RBAC test) tell the operator's own calls from Kopf's by this.
        self._api.user_agent = USER_AGENT
        self.calls: collections.Counter[str] = collections.Counter()
        self._present_until: dict[tuple[str, str], float] = {}
        # resourceVersion each applied object had after this client's last apply of it.
        self._applied_versions: dict[str, str] = {}

    async def close(self) -> None:
        """Closes the connection pool."""
        await self._api.close()
        self._files.cleanup()

    async def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | list[dict[str, Any]] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        accept: str = "application/json",
    ) -> dict[str, Any] | None:
        return (await self._send(method, path, body, content_type, params, accept))[1]

    async def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | list[dict[str, Any]] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        accept: str = "application/json",
    ) -> tuple[int, dict[str, Any] | None]:
        """(HTTP status, the object answered; None for 404)."""
        self.calls[method] += 1
        headers = {"Accept": accept, "Content-Type": content_type}
        try:
            payload, status, _headers = await self._api.call_api(
                path,
                method,
                query_params=list((params or {}).items()),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                # "object": the JSON as it came, for any kind (built-in or custom).
                response_types_map={200: "object", 201: "object", 202: "object"},
                _return_http_data_only=False,
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except ApiException as exc:
            if exc.status == 404:
                return 404, None
            answer: Any = None
            with contextlib.suppress(ValueError, TypeError):
                answer = json.loads(exc.body or "")
            message = answer.get("message", "") if isinstance(answer, dict) else ""
            details = answer.get("details") if isinstance(answer, dict) else None
            raise KubeError(
                exc.status or 0,
                message or exc.reason or "",
                details if isinstance(details, dict) else None,
            ) from exc
        return int(status), payload if isinstance(payload, dict) else {}

    async def get(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        metadata_only: bool = False,
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist.

        Args:
            metadata_only: Ask for its metadata only (a PartialObjectMetadata): for a Secret,
                its version without its data.
        """
        path = resource_path(api_version, kind, namespace, name)
        accept = METADATA_ONLY if metadata_only else "application/json"
        return await self._request("GET", path, accept=accept)

    async def apply(self, obj: Mapping[str, Any], force: bool = False) -> Applied:
        """Server-side apply under the operator's field manager: creates or updates in one call.

        Fields this manager applied before and ``obj`` no longer has are removed (unless
        another manager also owns them).

        Args:
            obj: The whole desired object (apiVersion, kind, metadata.name/namespace, ...).
            force: Take over fields another manager owns instead of failing.

        Raises:
            KubeError: 409 when another manager owns a field with a different value (its
                ``conflicting_managers`` name them), 404 when the kind is not served.
        """
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        params = {"fieldManager": FIELD_MANAGER}
        if force:
            params["force"] = "true"
        status, applied = await self._send("PATCH", path, obj, APPLY_PATCH, params)
        if applied is None:
            raise KubeError(404, f"the {obj['kind']} API is not installed")
        version = str(applied.get("metadata", {}).get("resourceVersion", ""))
        before = self._applied_versions.get(path)
        if len(self._applied_versions) > MAX_REMEMBERED_VERSIONS:  # children GC'd with owners
            self._applied_versions.clear()
        self._applied_versions[path] = version
        created = status == 201
        return Applied(applied, created, created or (before is not None and before != version))

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Creates an object (POST) under the operator's field manager; None when an object
        of that name exists already (409 AlreadyExists).

        The fields it sets are owned by the manager's Update entry, not its Apply entry, so a
        later server-side apply that leaves one of them out does not remove it.
        """
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        try:
            return await self._request("POST", path, obj, params={"fieldManager": FIELD_MANAGER})
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        """JSON merge patch (RFC 7386) of an object or its ``status``; None when it is gone."""
        path = resource_path(api_version, kind, namespace, name)
        if subresource:
            path = f"{path}/{subresource}"
        params = {"fieldManager": FIELD_MANAGER}
        return await self._request("PATCH", path, patch, MERGE_PATCH, params)

    async def json_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        operations: list[dict[str, Any]],
    ) -> dict[str, Any] | None:
        """JSON patch (RFC 6902): ``test`` operations make it all-or-nothing; None when gone.

        Raises:
            KubeError: 422 when a ``test`` failed (the object changed under the patch).
        """
        path = resource_path(api_version, kind, namespace, name)
        params = {"fieldManager": FIELD_MANAGER}
        return await self._request("PATCH", path, operations, JSON_PATCH, params)

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Deletes (background propagation); False when it was already gone."""
        path = resource_path(api_version, kind, namespace, name)
        self._applied_versions.pop(path, None)
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        return await self._request("DELETE", path, body) is not None

    async def list(
        self, api_version: str, kind: str, namespace: str, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """Objects in a namespace whose labels include ``labels``."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        found = await self._request(
            "GET", resource_path(api_version, kind, namespace), params={"labelSelector": selector}
        )
        items: list[dict[str, Any]] = (found or {}).get("items", [])
        # Filtered here too: selectors are the server's job, but a mismatch must never
        # make the operator delete an object that is not its own.
        return [
            item
            for item in items
            if all(
                item.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items()
            )
        ]

    async def api_installed(self, api_version: str, plural: str) -> bool:
        """True when the API server serves a resource (e.g. ray.io/v1 rayservices).

        Asks API discovery, which every authenticated client may read, so a namespaced
        operator without rights on CustomResourceDefinitions can tell too.
        """
        key = (api_version, plural)
        if self._present_until.get(key, 0.0) > time.monotonic():
            return True
        found = await self._request("GET", f"/apis/{api_version}")
        present = any(r.get("name") == plural for r in (found or {}).get("resources", []))
        if present:
            self._present_until[key] = time.monotonic() + DISCOVERY_TTL_S
        return present

"""Backends from the cluster: which graph serves which model, read from LLMDeployment status.

With ``discover_backends`` on, the gateway lists and watches LLMDeployments (read-only) and
routes each model name to the graph ingress its deployment reports in ``status.endpoints.http``,
so a model applied with `kubectl apply` is callable as soon as the operator reports it Ready,
without editing the gateway's configuration. Models of a deployment that is not ready yet are
known too, and answered with 503 and Retry-After instead of 404. A model whose status entry
reports ``readyReplicas: 0`` (scaled to zero, or its first replica starting) is routed, and its
requests are held until the entry reports a ready replica (see `llmops_gateway.hold`).

The API server is reached through the official asyncio client, ``kubernetes_asyncio``: the
pod's service account first (the library re-reads the projected token as it rotates), else the
kubeconfig ($KUBECONFIG or ~/.kube/config, exec and OIDC credentials refreshed by the library),
or, with ``kube_api_url``, a URL that needs no credentials (a local proxy such as `kubectl
proxy`). Each namespace is listed, then watched from the listed resourceVersion with bookmarks
and a server-side timeout; a watch whose version has expired (410 Gone) is answered by a new
list, as client-go's reflector does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader
from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger

from llmops_contract import AUTO_MODEL, GROUP, PLURAL, VERSION

logger = logging.getLogger("llmops.gateway.discovery")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_S = 300
LIST_TIMEOUT_S = 30
MAX_BACKOFF_S = 30.0
GONE = 410


@dataclass(frozen=True)
class Backend:
    """Where a model is served, and whether it is ready there."""

    url: str
    deployment: str
    """namespace/name of the LLMDeployment."""
    state: str
    """The model's state in that deployment's status: Ready, Loading, Pending or Failed."""
    ready_replicas: int | None = None
    """The model's ``readyReplicas`` in that status; None where the operator reports none."""

    @property
    def at_zero(self) -> bool:
        """True when the model has no ready replica but is not failed: its requests are held
        until one is ready."""
        return self.ready_replicas == 0 and self.state != "Failed"

    @property
    def ready(self) -> bool:
        """True when requests can go there: now, or held there until a replica is ready."""
        return self.state == "Ready" or self.at_zero


def _age_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return (
        str(meta.get("creationTimestamp") or ""),
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
    )


def backends_from(objects: Iterable[Mapping[str, Any]]) -> dict[str, Backend]:
    """Model name -> backend, for LLMDeployments as the API server returns them (each model's
    LoRA adapters too, under their own names).

    A deployment without an endpoint in its status yet is skipped. When two deployments serve
    the same model name, the older one keeps it (then namespace/name order), so a new
    deployment cannot take traffic away from a running one by reusing its name; ``auto``
    (semantic routing) goes to the oldest deployment with a semantic router.
    """
    table: dict[str, Backend] = {}
    for obj in sorted(objects, key=_age_key):
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        status = obj.get("status") or {}
        url = (status.get("endpoints") or {}).get("http")
        if not url:
            continue
        where = f"{meta.get('namespace')}/{meta.get('name')}"
        entries = {m.get("name"): m for m in status.get("models", []) if isinstance(m, dict)}
        # A LoRA adapter is served by its own name on its base model's replicas: it routes,
        # and is ready or at zero, as that model is.
        served = [
            (str(served_name), str(m["name"]))
            for m in spec.get("models", [])
            if m.get("name")
            for served_name in [
                m["name"],
                *(a.get("name") for a in m.get("adapters") or [] if a.get("name")),
            ]
        ]
        names = [name for name, _ in served]
        for name, parent in served:
            if name in table:
                if table[name].deployment != where:
                    logger.warning(
                        "model %s is served by %s and %s; routing to %s (the older)",
                        name,
                        table[name].deployment,
                        where,
                        table[name].deployment,
                    )
                continue
            entry = entries.get(parent) or {}
            replicas = entry.get("readyReplicas")
            table[name] = Backend(
                str(url),
                where,
                str(entry.get("state") or "Pending"),
                replicas if isinstance(replicas, int) and not isinstance(replicas, bool) else None,
            )
        if (spec.get("router") or {}).get("policy") == "semantic" and AUTO_MODEL not in table:
            ready = any(table[n].ready for n in names if table[n].deployment == where)
            table[AUTO_MODEL] = Backend(str(url), where, "Ready" if ready else "Pending")
    return table


def adapter_parents(objects: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """LoRA adapter name -> its base model's name (``spec.models[].adapters``), for the
    model lists' OpenAI ``parent``; as in `backends_from`, the older deployment keeps a name
    two of them declare."""
    owner: dict[str, str | None] = {}
    for obj in sorted(objects, key=_age_key):
        for model in (obj.get("spec") or {}).get("models", []):
            if not model.get("name"):
                continue
            owner.setdefault(str(model["name"]), None)
            for adapter in model.get("adapters") or []:
                if adapter.get("name"):
                    owner.setdefault(str(adapter["name"]), str(model["name"]))
    return {name: parent for name, parent in owner.items() if parent is not None}


@dataclass
class KubeAccess:
    """How discovery reaches the API server, chosen once at start-up.

    Attributes:
        configuration: The client configuration the library's loaders filled in.
        source: Where it came from, for logs and errors.
        kubeconfig: The kubeconfig loader still to run (it may call exec plugins, so it runs
            in `connect`), or None when ``configuration`` is complete.
    """

    configuration: client.Configuration
    source: str
    kubeconfig: KubeConfigLoader | None = None

    @classmethod
    def configure(cls, api_url: str | None) -> KubeAccess:
        """``api_url`` (no credentials: a local proxy), else the pod's service account, else
        the kubeconfig ($KUBECONFIG, or ~/.kube/config, at its current context).

        Raises:
            RuntimeError: none of the three is there.
        """
        configuration = client.Configuration()
        if api_url:
            configuration.host = api_url.rstrip("/")
            return cls(configuration, api_url)
        try:
            InClusterConfigLoader(
                token_filename=str(SERVICE_ACCOUNT / "token"),
                cert_filename=str(SERVICE_ACCOUNT / "ca.crt"),
            ).load_and_set(configuration)
        except config.ConfigException as in_cluster:
            path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            try:
                # persist_config off: the gateway never writes the user's kubeconfig.
                loader = KubeConfigLoader(
                    config_dict=KubeConfigMerger(path).config,
                    config_base_path=None,
                )
            except config.ConfigException as kubeconfig:
                raise RuntimeError(
                    "discover_backends needs the Kubernetes API: run in a pod with a service "
                    f"account ({in_cluster}), give a kubeconfig ({path}: {kubeconfig}), or set "
                    "LLMOPS_GATEWAY_KUBE_API_URL (for example to `kubectl proxy`)"
                ) from None
            return cls(configuration, f"kubeconfig {path}", loader)
        return cls(configuration, "the pod's service account")

    async def connect(self) -> client.ApiClient:
        """An API client (finishing the kubeconfig's credentials first, if any)."""
        if self.kubeconfig is not None:
            await self.kubeconfig.load_and_set(self.configuration)
        return client.ApiClient(configuration=self.configuration)


class ClusterBackends:
    """Keeps `table` equal to what the LLMDeployments in ``namespaces`` report.

    Args:
        access: The API server and credentials.
        namespaces: Namespaces to watch; empty watches all (needs cluster-wide list/watch).
    """

    def __init__(self, access: KubeAccess, namespaces: list[str]) -> None:
        self.access = access
        self.namespaces = namespaces
        self.table: dict[str, Backend] = {}
        self.parents: dict[str, str] = {}
        """LoRA adapter name -> its base model (`adapter_parents`)."""
        self.synced = asyncio.Event()
        """Set once every watched namespace has been listed."""
        self._objects: dict[str | None, dict[str, dict[str, Any]]] = {}
        self._listed: set[str | None] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: client.ApiClient | None = None

    async def start(self) -> None:
        """Starts one list-and-watch loop per namespace (or one for all of them)."""
        self._client = await self.access.connect()
        logger.info("discovering LLMDeployments through %s", self.access.source)
        api = client.CustomObjectsApi(self._client)
        watched: list[str | None] = [*self.namespaces] or [None]
        for namespace in watched:
            self._objects[namespace] = {}
            self._tasks.append(
                asyncio.create_task(
                    self._follow(api, namespace), name=f"watch llmdeployments in {namespace}"
                )
            )
        if self.access.kubeconfig is not None:
            # Exec-plugin and cloud tokens from a kubeconfig expire: the library renews them.
            self._tasks.append(
                asyncio.create_task(
                    config.refresh_token(self.access.kubeconfig, self.access.configuration),
                    name="refresh kubeconfig token",
                )
            )

    async def close(self) -> None:
        """Stops watching."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    def at_zero(self, model: str) -> bool:
        """Whether the model's deployment reports it at zero ready replicas (not failed)."""
        backend = self.table.get(model)
        return backend is not None and backend.at_zero

    def _publish(self) -> None:
        objects = [obj for by_key in self._objects.values() for obj in by_key.values()]
        self.table = backends_from(objects)
        self.parents = adapter_parents(objects)
        if all(namespace in self._listed for namespace in self._objects):
            self.synced.set()

    async def _follow(self, api: client.CustomObjectsApi, namespace: str | None) -> None:
        where = f"in namespace {namespace}" if namespace else "in all namespaces"
        backoff = 1.0
        while True:
            try:
                version: str | None = await self._list(api, namespace)
                backoff = 1.0
                while version is not None:
                    version = await self._watch(api, namespace, version)
                logger.info("the watch of LLMDeployments %s expired; listing again", where)
            # Any failure (HTTP, TLS, a malformed event) ends in a new list after a pause: a
            # watcher that died would leave the routing table stale for the process's life.
            except Exception as exc:
                logger.warning(
                    "cannot read LLMDeployments %s (%s); retrying in %.0f s",
                    where,
                    _describe(exc),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _list(self, api: client.CustomObjectsApi, namespace: str | None) -> str:
        if namespace:
            listing = await api.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, _request_timeout=LIST_TIMEOUT_S
            )
        else:
            listing = await api.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _request_timeout=LIST_TIMEOUT_S
            )
        self._objects[namespace] = {_key(obj): obj for obj in listing.get("items") or []}
        self._listed.add(namespace)
        self._publish()
        return str((listing.get("metadata") or {}).get("resourceVersion") or "0")

    async def _watch(
        self, api: client.CustomObjectsApi, namespace: str | None, version: str
    ) -> str | None:
        """Follows changes from ``version``; returns where to go on, or None to list again."""
        args: tuple[str, ...] = (
            (GROUP, VERSION, namespace, PLURAL) if namespace else (GROUP, VERSION, PLURAL)
        )
        function = (
            api.list_namespaced_custom_object if namespace else api.list_cluster_custom_object
        )
        # With timeout_seconds the library neither reconnects nor hides a 410: both come here.
        stream = watch.Watch().stream(
            function,
            *args,
            resource_version=version,
            timeout_seconds=WATCH_TIMEOUT_S,
            allow_watch_bookmarks=True,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=LIST_TIMEOUT_S, sock_read=WATCH_TIMEOUT_S + 30
            ),
        )
        try:
            async with stream:
                async for event in stream:
                    kind, obj = event["type"], event["raw_object"]
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED"):
                        self._objects[namespace][_key(obj)] = obj
                    elif kind == "DELETED":
                        self._objects[namespace].pop(_key(obj), None)
                    else:  # BOOKMARK: only the version moves
                        continue
                    self._publish()
        except client.ApiException as exc:
            if exc.status == GONE:  # the version is too old to watch from
                return None
            raise
        return version


def _describe(exc: BaseException) -> str:
    if isinstance(exc, client.ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"

"""Backends from the cluster: which graph serves which model, read from LLMDeployment status.

With ``discover_backends`` on, the gateway lists and watches LLMDeployments (read-only) and
routes each model name to the graph ingress its deployment reports in ``status.endpoints.http``,
so a model applied with `kubectl apply` is callable as soon as the operator reports it Ready,
without editing the gateway's configuration. Models of a deployment that is not ready yet are
known too, and answered with 503 and Retry-After instead of 404.

Credentials are the pod's service account (token re-read on every connection, as projected
tokens rotate), or none for a local API proxy (``kube_api_url``, e.g. `kubectl proxy`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

logger = logging.getLogger("llmops.gateway.discovery")

API = "/apis/llmops.dev/v1alpha1"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_S = 300
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Backend:
    """Where a model is served, and whether it is ready there."""

    url: str
    deployment: str
    """namespace/name of the LLMDeployment."""
    state: str
    """The model's state in that deployment's status: Ready, Loading, Pending or Failed."""

    @property
    def ready(self) -> bool:
        """True when requests can go there now."""
        return self.state == "Ready"


def _age_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return (
        str(meta.get("creationTimestamp") or ""),
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
    )


def backends_from(objects: Iterable[Mapping[str, Any]]) -> dict[str, Backend]:
    """Model name -> backend, for LLMDeployments as the API server returns them.

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
        states = {m.get("name"): str(m.get("state") or "Pending") for m in status.get("models", [])}
        names = [str(m["name"]) for m in spec.get("models", []) if m.get("name")]
        for name in names:
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
            table[name] = Backend(str(url), where, states.get(name, "Pending"))
        if (spec.get("router") or {}).get("policy") == "semantic" and "auto" not in table:
            ready = any(table[n].ready for n in names if table[n].deployment == where)
            table["auto"] = Backend(str(url), where, "Ready" if ready else "Pending")
    return table


@dataclass(frozen=True)
class KubeAccess:
    """How to reach the API server: its URL, and the credentials to send."""

    server: str
    token_file: Path | None
    ca_file: Path | None

    @classmethod
    def configure(cls, api_url: str | None) -> KubeAccess:
        """``api_url`` (no credentials: a local proxy), or the pod's service account.

        Raises:
            RuntimeError: no URL given and not running in a pod.
        """
        if api_url:
            return cls(api_url.rstrip("/"), None, None)
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host:
            raise RuntimeError(
                "discover_backends needs the Kubernetes API: run in a pod with a service "
                "account, or set LLMOPS_GATEWAY_KUBE_API_URL (for example to `kubectl proxy`)"
            )
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", SERVICE_ACCOUNT / "token", SERVICE_ACCOUNT / "ca.crt")

    def headers(self) -> dict[str, str]:
        """Authorization for the next connection (the token file is re-read: it rotates)."""
        if self.token_file is None:
            return {}
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS verification against the cluster's CA (None: plain http or system CAs)."""
        if self.ca_file is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file))


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
        self.synced = asyncio.Event()
        """Set once every watched namespace has been listed."""
        self._objects: dict[str, dict[str, dict[str, Any]]] = {}
        self._listed: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def _paths(self) -> list[str]:
        if not self.namespaces:
            return [f"{API}/llmdeployments"]
        return [f"{API}/namespaces/{ns}/llmdeployments" for ns in self.namespaces]

    async def start(self) -> None:
        """Starts one list-and-watch loop per path."""
        connector = aiohttp.TCPConnector(ssl=self.access.ssl_context() or True)
        self._session = aiohttp.ClientSession(connector=connector)
        for path in self._paths():
            self._objects[path] = {}
            self._tasks.append(asyncio.create_task(self._follow(path), name=f"watch {path}"))

    async def close(self) -> None:
        """Stops watching."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _publish(self) -> None:
        objects = [obj for by_key in self._objects.values() for obj in by_key.values()]
        self.table = backends_from(objects)
        if all(path in self._listed for path in self._objects):
            self.synced.set()

    async def _follow(self, path: str) -> None:
        backoff = 1.0
        while True:
            try:
                version: str | None = await self._list(path)
                backoff = 1.0
                while version is not None:
                    version = await self._watch(path, version)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
                logger.warning(
                    "cannot read LLMDeployments at %s (%s: %s); retrying in %.0f s",
                    path,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _list(self, path: str) -> str:
        assert self._session is not None
        async with self._session.get(
            f"{self.access.server}{path}",
            headers=self.access.headers(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=await response.text()
                )
            listing = await response.json(content_type=None)
        self._objects[path] = {_key(obj): obj for obj in listing.get("items") or []}
        self._listed.add(path)
        self._publish()
        return str((listing.get("metadata") or {}).get("resourceVersion") or "0")

    async def _watch(self, path: str, version: str) -> str | None:
        """Follows changes from ``version``; returns where to go on, or None to list again."""
        assert self._session is not None
        params = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        async with self._session.get(
            f"{self.access.server}{path}",
            params=params,
            headers=self.access.headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 30),
        ) as response:
            if response.status != 200:
                return None
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # 410 Gone: the version is too old to watch from
                    return None
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED"):
                    self._objects[path][_key(obj)] = obj
                elif kind == "DELETED":
                    self._objects[path].pop(_key(obj), None)
                else:  # BOOKMARK: only the version moves
                    continue
                self._publish()
        return version


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"

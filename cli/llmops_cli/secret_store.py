"""The gateway's key file kept in a Kubernetes Secret, edited through the official client.

The chart mounts this Secret into the gateway pods, which re-read the file when kubelet
refreshes it. The `kubernetes` package does the talking and the credentials: the kubeconfig
($KUBECONFIG, or ~/.kube/config; its current context, or the one named), with whatever it
names (client certificates, tokens, exec plugins), else the pod's service account when there is
no kubeconfig. Every change is a read, an edit and a replace of the version that was read: a
concurrent change makes the API server refuse the write (409 Conflict), and the edit is redone
on the new version, so nothing is lost. Writers that keep colliding back off for a random,
growing time (as client-go's RetryOnConflict does), so that a burst of them spreads out
instead of colliding in lockstep; they give up only after ``RETRY_SECONDS``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import urllib3
from kubernetes import client, config

from llmops_cli.keys import SecretStoreError
from llmops_gateway.keys import EditableKeyStore, KeyFile, KeyRecord, dump_document

RETRY_SECONDS = 60.0
BACKOFF_SECONDS = (0.05, 2.0)  # first and largest wait between two attempts
REQUEST_TIMEOUT = (10.0, 30.0)  # connect, read
CONFLICT, NOT_FOUND = 409, 404
T = TypeVar("T")


def parse_secret_ref(ref: str) -> tuple[str, str]:
    """``namespace/name`` -> (namespace, name).

    Raises:
        ValueError: not of that form.
    """
    namespace, _, name = ref.partition("/")
    if not namespace or not name or "/" in name:
        raise ValueError(
            f"a Secret is named NAMESPACE/NAME, e.g. llmops/llmops-gateway-keys: {ref}"
        )
    return namespace, name


def kubeconfig_files() -> list[str]:
    """The kubeconfig files that exist: $KUBECONFIG's (a path list), else ~/.kube/config."""
    listed = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return [p for p in listed.split(os.pathsep) if p and Path(p).expanduser().exists()]


def api_configuration(context: str | None) -> client.Configuration:
    """The client configuration the library's loaders build: kubeconfig, else in-cluster.

    Raises:
        SecretStoreError: no kubeconfig (or not the context asked for) and not in a pod.
    """
    configuration = client.Configuration()
    files = kubeconfig_files()
    if files or context:
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.pathsep.join(files) or None,
                context=context,
                client_configuration=configuration,
            )
        except config.ConfigException as exc:
            where = os.pathsep.join(files) or "no kubeconfig found"
            raise SecretStoreError(f"cannot use the kubeconfig ({where}): {exc}") from None
        return configuration
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException as exc:
        raise SecretStoreError(
            "no kubeconfig ($KUBECONFIG or ~/.kube/config) and not running in a pod "
            f"({exc}): point $KUBECONFIG at the cluster's kubeconfig"
        ) from None
    return configuration


def _status_message(exc: client.ApiException) -> str:
    """The API server's own explanation (a Status object's message), else the HTTP reason."""
    try:
        status = json.loads(exc.body or "")
    except (TypeError, ValueError):
        status = None
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"])
    return str(exc.reason or "no reason given")


class SecretKeyStore(EditableKeyStore):
    """The key document in ``data[key]`` of a Secret.

    Args:
        namespace: The Secret's namespace (the chart's release namespace).
        name: The Secret's name (the chart's ``gateway.keys.existingSecret``).
        key: The data key holding the document (``gateway.keys.secretKey``).
        context: Kubeconfig context; None uses the current one.
    """

    def __init__(
        self, namespace: str, name: str, key: str = "keys.json", context: str | None = None
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.key = key
        self.context = context
        self._api: client.CoreV1Api | None = None

    def __str__(self) -> str:
        return f"Secret {self.namespace}/{self.name} (key {self.key})"

    def _core(self) -> client.CoreV1Api:
        if self._api is None:
            configuration = api_configuration(self.context)
            self._api = client.CoreV1Api(client.ApiClient(configuration))
        return self._api

    def _call(self, verb: str, call: Callable[..., T], *args: object) -> T:
        """Runs one API call; failures other than 404 and 409 become a SecretStoreError."""
        try:
            return call(*args, _request_timeout=REQUEST_TIMEOUT)
        except client.ApiException as exc:
            if exc.status in (NOT_FOUND, CONFLICT):
                raise
            reason = f"HTTP {exc.status} {exc.reason or ''}".strip()
            raise SecretStoreError(
                f"the API server refused to {verb} secrets in namespace {self.namespace} "
                f"({reason}): {_status_message(exc)}"
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            host = self._core().api_client.configuration.host
            raise SecretStoreError(
                f"cannot reach the Kubernetes API at {host}: {getattr(exc, 'reason', exc)}"
            ) from None

    def _read(self) -> client.V1Secret | None:
        """The Secret, or None when it does not exist."""
        try:
            api = self._core()
            return self._call("get", api.read_namespaced_secret, self.name, self.namespace)
        except client.ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            raise SecretStoreError(f"cannot read {self}: {_status_message(exc)}") from None

    def _document(self, secret: client.V1Secret | None) -> KeyFile:
        encoded = ((secret.data if secret is not None else None) or {}).get(self.key)
        if not encoded:
            return KeyFile()
        try:
            raw = encoded.encode() if isinstance(encoded, str) else encoded
            return KeyFile.model_validate_json(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise SecretStoreError(f"{self} does not hold a key file: {exc}") from exc

    def _missing(self) -> SecretStoreError:
        return SecretStoreError(
            f"{self} does not exist; `llmops keys create --secret "
            f"{self.namespace}/{self.name}` creates it"
        )

    def load(self) -> KeyFile:
        """The stored document.

        Raises:
            SecretStoreError: the Secret does not exist (a misspelt name is not an empty store).
        """
        secret = self._read()
        if secret is None:
            raise self._missing()
        return self._document(secret)

    def revoke(self, key_id: str) -> KeyRecord:
        """Revokes a key by its public id (see `EditableKeyStore.revoke`).

        Raises:
            SecretStoreError: the Secret does not exist.
        """
        if self._read() is None:
            raise self._missing()
        return super().revoke(key_id)

    def update(self, change: Callable[[KeyFile], T]) -> T:
        """Applies ``change`` and writes the Secret back, redoing it after a conflict.

        A missing Secret is created; an existing one is replaced at the resourceVersion read,
        so a write over a newer version is refused (409) and redone.
        """
        deadline = time.monotonic() + RETRY_SECONDS
        wait, longest = BACKOFF_SECONDS
        while True:
            secret = self._read()
            document = self._document(secret)
            result = change(document)
            encoded = base64.b64encode(dump_document(document).encode()).decode()
            try:
                if secret is None:
                    body = client.V1Secret(
                        api_version="v1",
                        kind="Secret",
                        type="Opaque",
                        metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                        data={self.key: encoded},
                    )
                    api = self._core()
                    self._call("create", api.create_namespaced_secret, self.namespace, body)
                else:
                    # metadata.resourceVersion stays: the write succeeds only over that version.
                    secret.data = {**(secret.data or {}), self.key: encoded}
                    api = self._core()
                    self._call(
                        "update", api.replace_namespaced_secret, self.name, self.namespace, secret
                    )
                return result
            except client.ApiException as exc:
                if exc.status == NOT_FOUND:  # the namespace, on create
                    raise SecretStoreError(
                        f"cannot create {self}: {_status_message(exc)}"
                    ) from None
                # 409: changed since our read (Conflict), or created meanwhile (AlreadyExists).
            if time.monotonic() + wait > deadline:
                raise SecretStoreError(
                    f"{self} kept changing under us for {RETRY_SECONDS:.0f} s; try again"
                )
            time.sleep(random.uniform(0, wait))  # noqa: S311 - jitter, not a secret
            wait = min(2 * wait, longest)

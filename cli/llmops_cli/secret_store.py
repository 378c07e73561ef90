"""The gateway's key file kept in a Kubernetes Secret, edited with kubectl.

The chart mounts this Secret into the gateway pods, which re-read the file when kubelet
refreshes it. kubectl does the talking, so whatever reaches the cluster for the user (contexts,
exec credential plugins, proxies) works here too. Every change is a read, an edit and a
`kubectl replace` of the version that was read: a concurrent change makes the API server refuse
the write (409 Conflict), and the edit is redone on the new version, so nothing is lost. Writers
that keep colliding back off for a random, growing time (as client-go's RetryOnConflict does), so
that a burst of them spreads out instead of colliding in lockstep; they give up only after
``RETRY_SECONDS``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

from llmops_gateway.keys import EditableKeyStore, KeyFile, dump_document

KUBECTL_ENV = "LLMOPS_KUBECTL"
RETRY_SECONDS = 60.0
BACKOFF_SECONDS = (0.05, 2.0)  # first and largest wait between two attempts
T = TypeVar("T")


class SecretStoreError(Exception):
    """kubectl is missing, or the API server refused; the message says what to do."""


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


class SecretKeyStore(EditableKeyStore):
    """The key document in ``data[key]`` of a Secret.

    Args:
        namespace: The Secret's namespace (the chart's release namespace).
        name: The Secret's name (the chart's ``gateway.keys.existingSecret``).
        key: The data key holding the document (``gateway.keys.secretKey``).
        context: kubectl context; None uses the current one.
    """

    def __init__(
        self, namespace: str, name: str, key: str = "keys.json", context: str | None = None
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.key = key
        self.context = context

    def __str__(self) -> str:
        return f"Secret {self.namespace}/{self.name} (key {self.key})"

    def _kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        binary = os.environ.get(KUBECTL_ENV) or shutil.which("kubectl")
        if not binary:
            raise SecretStoreError(f"kubectl not found: put it on PATH or set ${KUBECTL_ENV}")
        command = [binary, *(["--context", self.context] if self.context else []), *args]
        try:
            return subprocess.run(
                command, input=stdin, capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SecretStoreError(f"kubectl failed: {exc}") from exc

    def _read(self) -> dict[str, Any] | None:
        """The Secret, or None when it does not exist."""
        result = self._kubectl(
            "get", "secret", self.name, "--namespace", self.namespace, "--output", "json"
        )
        if result.returncode != 0:
            if "(NotFound)" in result.stderr:
                return None
            raise SecretStoreError(f"cannot read {self}: {result.stderr.strip()}")
        secret: dict[str, Any] = json.loads(result.stdout)
        return secret

    def _document(self, secret: dict[str, Any] | None) -> KeyFile:
        encoded = ((secret or {}).get("data") or {}).get(self.key)
        if not encoded:
            return KeyFile()
        try:
            return KeyFile.model_validate_json(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise SecretStoreError(f"{self} does not hold a key file: {exc}") from exc

    def load(self) -> KeyFile:
        """The stored document; a missing Secret is an empty store."""
        return self._document(self._read())

    def update(self, change: Callable[[KeyFile], T]) -> T:
        """Applies ``change`` and writes the Secret back, redoing it after a conflict."""
        deadline = time.monotonic() + RETRY_SECONDS
        wait, longest = BACKOFF_SECONDS
        while True:
            secret = self._read()
            document = self._document(secret)
            result = change(document)
            encoded = base64.b64encode(dump_document(document).encode()).decode()
            if secret is None:
                secret = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                }
                verb = "create"
            else:
                # resourceVersion stays: the write succeeds only over the version read.
                verb = "replace"
            secret["data"] = {**(secret.get("data") or {}), self.key: encoded}
            # No client-side schema check (it downloads the cluster's OpenAPI documents): the
            # object has a fixed shape built here, and the API server validates it anyway.
            written = self._kubectl(
                verb, "--filename", "-", "--validate=false", stdin=json.dumps(secret)
            )
            if written.returncode == 0:
                return result
            if "Conflict" not in written.stderr and "AlreadyExists" not in written.stderr:
                raise SecretStoreError(f"cannot write {self}: {written.stderr.strip()}")
            if time.monotonic() + wait > deadline:
                raise SecretStoreError(
                    f"{self} kept changing under us for {RETRY_SECONDS:.0f} s; try again"
                )
            time.sleep(random.uniform(0, wait))  # noqa: S311 - jitter, not a secret
            wait = min(2 * wait, longest)

"""Runs a gateway process in front of a local graph: what `llmops up` uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops_gateway.keys import FileKeyStore, Tenant

LOCAL_TENANT = "local"
LOCAL_KEY_DESCRIPTION = "created by llmops up"


def issue_local_key(store: FileKeyStore) -> str:
    """Creates the key `llmops up` prints, revoking the ones earlier runs printed.

    Returns:
        The new key (shown once, stored as a hash).
    """
    for record in store.load().keys:
        if record.description == LOCAL_KEY_DESCRIPTION and record.active:
            store.revoke(record.id)
    _, key = store.create(Tenant(name=LOCAL_TENANT), LOCAL_KEY_DESCRIPTION)
    return key


@contextmanager
def run_gateway(
    backend: str,
    keys_file: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    metrics_port: int = 9464,
    grpc_port: int = 50051,
    timeout_s: float = 60.0,
) -> Iterator[str]:
    """Starts ``python -m llmops_gateway`` in front of ``backend`` and yields its URL.

    Raises:
        RuntimeError: the gateway exited or did not answer within ``timeout_s``.
    """
    env = dict(
        {"LLMOPS_GATEWAY_LOG_FORMAT": "console"},
        **os.environ,
        LLMOPS_GATEWAY_HOST=host,
        LLMOPS_GATEWAY_PORT=str(port),
        LLMOPS_GATEWAY_METRICS_PORT=str(metrics_port),
        LLMOPS_GATEWAY_GRPC_PORT=str(grpc_port),
        LLMOPS_GATEWAY_DEFAULT_BACKEND=backend,
        LLMOPS_GATEWAY_KEYS_FILE=str(keys_file),
    )
    process = subprocess.Popen([sys.executable, "-m", "llmops_gateway"], env=env)
    url = f"http://{host}:{port}"
    try:
        wait_http_ready(process, f"{url}/readyz", "the gateway", timeout_s)
        yield url
    finally:
        stop_process(process, timeout_s=60)


def wait_http_ready(
    process: subprocess.Popen[Any],
    url: str,
    what: str,
    timeout_s: float,
    detail: Callable[[], str] = lambda: "",
    error: type[RuntimeError] = RuntimeError,
) -> None:
    """Polls ``url`` until it answers.

    Raises:
        error: ``process`` exited first (with ``detail()`` appended), or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise error(f"{what} exited with {process.returncode}{detail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310
                return
        except OSError:
            if time.monotonic() > deadline:
                raise error(f"{what} did not answer on {url}") from None
            time.sleep(0.1)


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 30) -> None:
    """SIGTERM, wait up to ``timeout_s`` (time to drain), then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

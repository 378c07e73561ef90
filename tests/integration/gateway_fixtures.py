"""Processes for gateway tests: the stub upstream and gateways in front of it.

The module-scoped fixtures ``upstream`` and ``keys`` serve each test module that imports them
(`upstream_fixture`, `keys_fixture`), and `stub_gateway` runs that module's gateway on both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmops_gateway.keys import FileKeyStore
from llmops_gateway.local import stop_process
from tests.conftest import free_port


@dataclass(frozen=True)
class Gateway:
    """A running gateway process."""

    url: str
    grpc_target: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    log: Path


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


@contextmanager
def stub_upstream(
    token_delay: float = 0.0, models: tuple[str, ...] = ("stub-chat", "stub-embed")
) -> Iterator[str]:
    """Runs tests.fakes.openai_stub serving ``models``; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.fakes.openai_stub", "--port", str(port)),
            *("--token-delay", str(token_delay), "--models", ",".join(models)),
        ],
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, timeout_s=10)


@contextmanager
def gateway(
    log_dir: Path, *, environment: dict[str, str] | None = None, **settings: object
) -> Iterator[Gateway]:
    """Runs `python -m llmops_gateway` with LLMOPS_GATEWAY_* settings (and ``environment``
    over this process's); SIGTERM on exit."""
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    env = {**os.environ, **(environment or {})}
    ports = {"port": port, "metrics_port": metrics_port, "grpc_port": grpc_port}
    for key, value in {**ports, **settings}.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[f"LLMOPS_GATEWAY_{key.upper()}"] = text
    log = log_dir / f"gateway-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmops_gateway"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz")
        yield Gateway(
            url, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", process, log
        )
    finally:
        stop_process(process)


@pytest.fixture(scope="module", name="upstream")
def upstream_fixture() -> Iterator[str]:
    """The stub upstream, one for the test module."""
    with stub_upstream() as url:
        yield url


@pytest.fixture(scope="module", name="keys")
def keys_fixture(tmp_path_factory: pytest.TempPathFactory) -> FileKeyStore:
    """An empty key file, one for the test module."""
    return FileKeyStore(tmp_path_factory.mktemp("keys") / "keys.json")


@contextmanager
def stub_gateway(
    upstream: str,
    redis_url: str,
    keys: FileKeyStore,
    tmp_path_factory: pytest.TempPathFactory,
    **settings: object,
) -> Iterator[Gateway]:
    """A gateway in front of ``upstream`` with Redis limits and the keys of ``keys``."""
    with gateway(
        tmp_path_factory.mktemp("gw"),
        default_backend=upstream,
        keys_file=keys.path,
        redis_url=redis_url,
        **settings,
    ) as running:
        yield running

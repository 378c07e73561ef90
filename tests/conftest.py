"""Shared fixtures: the real serving graph, started once per test session with `llmops up`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_GRAPH = ROOT / "tests" / "graph.yaml"
STARTUP_TIMEOUT_S = 900
READY_BANNER = "Press Ctrl-C to stop."


@dataclass(frozen=True)
class RunningGraph:
    """The `llmops up` process the tests drive."""

    url: str
    process: subprocess.Popen[str]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGraph]:
    """Runs `llmops up --config tests/graph.yaml` and waits until it is ready."""
    port = free_port()
    log = tmp_path_factory.mktemp("graph") / "llmops-up.log"
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "llmops_cli",
        "up",
        "--config",
        str(TEST_GRAPH),
        "--port",
        str(port),
    ]
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    # Ready for a user means both: the router answers, and `llmops up` has printed its banner.
    while not (_ready(url) and READY_BANNER in log.read_text()):
        if process.poll() is not None:
            pytest.fail(f"llmops up exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"graph not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    yield RunningGraph(url=url, process=process, log=log)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

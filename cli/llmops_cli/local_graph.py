"""Runs the serving graph on a local Ray instance: what `llmops up` and the tests use.

Single-machine helpers live here, with the CLI, not in the serving package: a cluster's
graph runs without any of them (KubeRay starts Ray, each engine has its pod).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmops_cli.placement import DEFAULT_HOUSEKEEPING_NICE, Placer
from llmops_cli.scale import DEFAULT_SERVE_API_PORT, deploy, serve_config
from llmops_contract import APP_NAME, GraphConfig
from llmops_services.sources import Progress, resolve_source

THROUGHPUT_OPTIMIZED_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
logger = logging.getLogger(__name__)
StatusCallback = Callable[[str], None]


@dataclass(frozen=True)
class LocalGraph:
    """A running local graph."""

    url: str
    """Base URL of the router, e.g. ``http://127.0.0.1:8000``."""
    config: GraphConfig
    ray_logs: str
    """Folder where Ray writes the replicas' logs."""
    serve_api: str
    """The Ray dashboard's URL: Serve's REST API, which `llmops scale` PUTs configs to."""


def logical_cpus(config: GraphConfig) -> int:
    """Logical CPUs Ray must advertise so every replica of the graph can be placed.

    Ray counts logical CPUs, not cores: each LLM replica takes its actor's CPU plus its
    engine's placement bundle, so the default graph needs more than a laptop's core count.
    """
    # A model at zero still gets room for one replica: `llmops scale` starts it later.
    llm = sum((1 + max(spec.resources.cpus, 1.0)) * max(spec.replicas, 1) for spec in config.llms)
    encoder = config.encoder.resources.cpus * config.encoder.replicas if config.encoder else 0
    router = 0.5 * config.router.replicas
    return max(int(llm + encoder + router) + 2, os.cpu_count() or 1)


def prefetch(config: GraphConfig, progress: Progress | None = None) -> None:
    """Resolves every model source once, with progress, before replicas start."""
    cache = Path(config.model_cache_dir) if config.model_cache_dir else None
    sources = [spec.source for spec in config.llms]
    if config.encoder is not None:
        sources.append(config.encoder.source)
    for source in dict.fromkeys(sources):
        resolve_source(source, cache, progress)


SERVE_SCHEMA_LOCK = threading.Lock()
"""Held around every call of this process that builds Serve's config objects (a deploy, a
status read). Ray validates an ``AutoscalingConfig`` by registering its policy module with
cloudpickle's process-wide pickle-by-value set and removing it again (ray/serve/config.py
``serialize_policy``): two threads doing that at once make one's removal fail with "is not
registered for pickle by value", which stopped `llmops up` at start-up now and then."""


def _deployment_summary() -> str:
    from ray import serve

    with SERVE_SCHEMA_LOCK:
        status = serve.status()
    app = status.applications.get(APP_NAME)
    if app is None:
        return "deploying"
    states = [f"{name}: {d.status.value.lower()}" for name, d in app.deployments.items()]
    return ", ".join(sorted(states)) or app.status.value.lower()


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Polls the router's readiness endpoint until it answers 200.

    Raises:
        TimeoutError: not ready within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            # The URL is built from our own host and port: http only.
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s ({last})")


def wait_deployed(timeout_s: float = 3600.0) -> None:
    """Waits until Serve reports the graph's application RUNNING (every replica started).

    A deploy from a config returns at once; ``serve.run`` used to wait, and to raise when the
    application failed, which this does too.

    Raises:
        RuntimeError: the application failed to deploy; the message is Serve's.
        TimeoutError: not running within ``timeout_s``.
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with SERVE_SCHEMA_LOCK:
            app = serve.status().applications.get(APP_NAME)
        state = app.status.value if app is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED":
            problems = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
            raise RuntimeError(f"the graph failed to deploy: {app.message or '; '.join(problems)}")
        time.sleep(0.5)
    raise TimeoutError(f"the graph was not running after {timeout_s:.0f} s")


@contextmanager
def run_local(
    config: GraphConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    progress: Progress | None = None,
    on_status: StatusCallback | None = None,
    metrics_port: int | None = None,
    housekeeping_nice: int = DEFAULT_HOUSEKEEPING_NICE,
    reserve_engine_cpus: bool = False,
    serve_api_port: int = DEFAULT_SERVE_API_PORT,
) -> Iterator[LocalGraph]:
    """Starts Ray and the graph, yields once it is ready, and shuts both down after.

    Args:
        config: The graph to serve.
        host: Interface the HTTP proxy binds.
        port: HTTP port of the router.
        progress: Receives a line per long model step (fetch, convert).
        on_status: Receives deployment states about once a second while replicas start.
        metrics_port: Where Ray's metrics agent serves Prometheus metrics (Serve, vLLM engine,
            router and encoder); None leaves Ray's choice.
        housekeeping_nice: Steps of niceness Ray's housekeeping runs below the graph (0-19).
        reserve_engine_cpus: Keep the graph's other processes off the CPUs vLLM binds its
            compute threads to (placement.py; opt-in).
        serve_api_port: Port of the Ray dashboard, whose Serve REST API deploys the graph
            (and later takes `llmops scale`'s configs).
    """
    # vLLM announces at import that Triton has no CPU backend: noise on a local console.
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    # Ray Serve's throughput mode (gRPC between replicas, user code on the replica's own event
    # loop, one HTTP proxy, garbage collection frozen after start-up; replica logs to files
    # only): read when ray.serve is first imported, inherited by every Ray process. It cut the
    # CPU the proxy, router and LLM replica spend per streamed token by 23-30%
    # (docs/benchmarks.md). "0" turns it off.
    os.environ.setdefault(THROUGHPUT_OPTIMIZED_ENV, "1")
    # Its ingress replicas stay up 30 s after they are told to stop, for a load balancer to
    # deregister them; one machine has none, and Ctrl-C would wait that long.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    # The Serve controller checks every deployment ten times a second by default, and with
    # GCS that was a third of what an idle local graph costs; a local graph has fixed replica
    # counts, and twice a second cut that part by 60% (docs/benchmarks.md).
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    # Ray starts its workers at nice 15, below its own daemons, so that on a shared cluster
    # node the raylet and GCS stay responsive. Here the workers are the graph: its replicas
    # and the vLLM engines they start. At 15 every wake-up of GCS, the agents or the log
    # monitor took a core from the engine at once; at 0 the engine runs as it does alone, and
    # the housekeeping processes are lowered instead once the graph is up (placement.py).
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    placer = Placer(housekeeping_nice, reserve_engine_cpus)
    prefetch(config, progress)
    # Replicas start vLLM workers with spawn; they inherit this environment.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    context = ray.init(
        num_cpus=logical_cpus(config),
        # The dashboard serves Serve's REST API: the graph is deployed through it, as KubeRay
        # deploys a RayService's serveConfigV2, so that `llmops scale` can change one model.
        include_dashboard=True,
        dashboard_host=host,
        dashboard_port=serve_api_port,
        log_to_driver=False,
        configure_logging=False,
        _metrics_export_port=metrics_port,
    )
    stop = threading.Event()
    try:
        serve.start(http_options={"host": host, "port": port})
        if on_status is not None:
            watcher = threading.Thread(
                target=_watch, args=(stop, on_status), name="llmops-status", daemon=True
            )
            watcher.start()
        serve_api = f"http://{host}:{serve_api_port}"
        with SERVE_SCHEMA_LOCK:
            deploy(serve_api, serve_config(config, host, port))
        url = f"http://{host}:{port}"
        wait_deployed()
        wait_ready(url)
        stop.set()
        placer.start()
        logs = str(Path(context.address_info["session_dir"]) / "logs")
        yield LocalGraph(url=url, config=config, ray_logs=logs, serve_api=serve_api)
    finally:
        stop.set()
        placer.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _watch(stop: threading.Event, on_status: StatusCallback) -> None:
    while not stop.wait(1.0):
        try:
            on_status(_deployment_summary())
        except Exception as exc:  # status is best effort while the controller starts
            logger.debug("serve status unavailable: %s", exc)

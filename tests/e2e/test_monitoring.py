"""Every dashboard query returns data from a real Prometheus scraping the running platform.

`llmops up --monitoring` (the session's graph fixture) runs Prometheus scraping the gateway
and Ray (Serve, the vLLM engines, router and encoder metrics). The operator runs here against
the KMock API server with its metrics port added as a file_sd target, with one LLMDeployment
reported Ready and one invalid. A short load goes through the gateway (chat, streaming,
completions, embeddings, semantic routing, a tenant over its rate limit); then every non-GPU
panel query of the shipped dashboards must return a finite value. GPU panels must parse here
(no DCGM exporter without a GPU); their data is checked on synthetic DCGM series by promtool
(tests/integration/test_rules.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client import start_http_server

from llmops_gateway.keys import FileKeyStore, Tenant
from tests.conftest import RunningGraph, free_port
from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import (
    create,
    eventually,
    example,
    live,
    report_children_ready,
    running_operator,
)

pytestmark = [pytest.mark.slow, pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(600)]

DASHBOARDS = Path(__file__).parents[2] / "deploy" / "dashboards"
RULES = Path(__file__).parents[2] / "deploy" / "rules" / "platform.yaml"
GPU_DASHBOARD = "llmops-gpus.json"
AFTER_A_HOLD = {
    "Hold time until served or expired (gateway)": "its histogram has samples only once a "
    "request was held for a model at zero; every model of the shared test graph serves (scaling "
    "one to zero costs a cold start of about a minute and would disturb the modules after "
    "this one). The series it reads are checked in tests/integration/test_gateway_hold.py, the "
    "hold itself on the real graph in tests/integration/test_scale_from_zero.py.",
}
"""Panels that chart an event this test's load cannot cause, with the reason: their queries
must still parse and evaluate."""
# What Grafana substitutes with every variable at "All" and a 1-minute rate window (prices:
# the usage dashboard's text boxes, at 1).
VARIABLES = {
    "$namespace": ".*",
    "$deployment": ".*",
    "$model": ".*",
    "$tenant": ".*",
    "$input_price": "1",
    "$output_price": "1",
    "$gpu_hour_price": "1",
    "$__rate_interval": "1m",
}
GEO, CODING, ENCODER = "smollm2-geography", "smollm2-coding", "all-minilm-l6-v2"


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) for every panel target."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], substitute(target["expr"])))
    return found


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, variable, label_values(...) query) for every query variable."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                found.append((path.name, variable["name"], substitute(variable["query"])))
    return found


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector; fails the test on a query error."""
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(item["value"][1])) for item in result)


def label_values(prometheus: str, variable_query: str) -> list[str]:
    found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable_query)
    assert found, variable_query
    selector, label = found.groups()
    response = httpx.get(
        f"{prometheus}/api/v1/label/{urllib.parse.quote(label)}/values",
        params={"match[]": selector},
        timeout=30,
    )
    values: list[str] = response.json()["data"]
    return values


def drive_load(graph: RunningGraph, limited_key: str, stop: threading.Event) -> None:
    """Requests of every kind the dashboards chart, through the gateway, until ``stop``.

    vLLM sets its gauges (running, waiting, KV cache) while its engine steps, and Ray drops a
    gauge that is not refreshed for two report intervals: the load keeps going while the
    panels are queried, as on a dashboard watched during traffic.
    """
    client = openai.OpenAI(base_url=f"{graph.url}/v1", api_key=graph.key, max_retries=0)
    limited = openai.OpenAI(base_url=f"{graph.url}/v1", api_key=limited_key, max_retries=0)
    # Longer than a KV-cache block (128 tokens on CPU), so repeating it hits the prefix cache.
    question = [{"role": "user", "content": "What is the capital of France? " * 40}]
    while not stop.is_set():
        for model in (GEO, CODING):  # the same long prompt again: prefix-cache hits
            client.chat.completions.create(model=model, messages=question, max_tokens=8)
        chunks = client.chat.completions.create(
            model=GEO, messages=question, max_tokens=32, stream=True
        )
        assert list(chunks)
        client.completions.create(model=GEO, prompt="Hello,", max_tokens=4)
        client.embeddings.create(model=ENCODER, input=["a", "b", "c"])
        client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "Write a Python function that adds numbers."}],
            max_tokens=4,
        )
        with contextlib.suppress(openai.RateLimitError):  # one a minute: 429s by reason
            limited.embeddings.create(model=ENCODER, input="x")


def targets(prometheus: str) -> str:
    found = httpx.get(f"{prometheus}/api/v1/targets", timeout=30).json()["data"]["activeTargets"]
    return "\n".join(f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in found)


async def test_every_dashboard_query_returns_data(graph: RunningGraph, kmock: KubeAPI) -> None:
    _, limited_key = FileKeyStore(graph.keys_file).create(
        Tenant(name="limited", requests_per_minute=1), "rate-limited tenant (monitoring test)"
    )
    kmock.install_crds()
    metrics_port = free_port()
    queries = [q for q in dashboard_queries() if q[0] != GPU_DASHBOARD and q[1] not in AFTER_A_HOLD]
    assert len(queries) > 30
    with_data: set[str] = set()
    stop = threading.Event()
    async with running_operator(kmock) as operator:
        server, _ = start_http_server(metrics_port, "127.0.0.1", operator.metrics.registry)
        (graph.prometheus_targets / "operator.json").write_text(
            json.dumps([{"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"job": "op"}}])
        )
        await create(kmock, example("llama-8b-gpu"))  # a model cache per pod: no loader Job
        await eventually(
            lambda: (
                live(kmock, "ray.io/v1/rayservices")
                and live(kmock, "keda.sh/v1alpha1/scaledobjects")
            ),
            what="RayService and ScaledObject",
        )
        await report_children_ready(kmock, "llama-8b", None, ["llm-llama-3-1-8b-instruct"])
        invalid = example("semantic-routing")
        for model in invalid["spec"]["models"]:
            model["routeExamples"] = []  # unusable: a reconcile error
        kmock.cel_rules = False  # an older CRD: its CEL rule would refuse it at the API server
        await create(kmock, invalid)

        load = asyncio.create_task(asyncio.to_thread(drive_load, graph, limited_key, stop))
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and len(with_data) < len(queries) and not load.done():
                await asyncio.sleep(5)
                for _, _, expr in queries:
                    if expr not in with_data and has_finite_value(
                        query(graph.prometheus_url, expr)
                    ):
                        with_data.add(expr)
        finally:
            stop.set()
            server.shutdown()
            await load  # re-raises what the load met
    missing = [f"{b} / {t}: {e}" for b, t, e in queries if e not in with_data]
    assert missing == [], (
        "panels without data:\n" + "\n".join(missing) + "\n" + targets(graph.prometheus_url)
    )

    for board, title, expr in dashboard_queries():
        if board == GPU_DASHBOARD or title in AFTER_A_HOLD:
            # Parses and evaluates: no DCGM exporter here, no hold (AFTER_A_HOLD).
            query(graph.prometheus_url, expr)
    empty = [
        f"{board} ${name}: {expr}"
        for board, name, expr in variable_queries()
        if not label_values(graph.prometheus_url, expr)
    ]
    assert empty == [], "variables without values:\n" + "\n".join(empty)


def test_prometheus_scrapes_the_gateway_and_ray(graph: RunningGraph) -> None:
    targets = httpx.get(f"{graph.prometheus_url}/api/v1/targets", timeout=30).json()
    health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
    assert health.get("gateway") == "up"
    assert health.get("ray") == "up"
    # The platform's alert and recording rules are loaded, as the chart ships them.
    shipped = yaml.safe_load(RULES.read_text())
    loaded = httpx.get(f"{graph.prometheus_url}/api/v1/rules", timeout=30).json()
    names = {r["name"] for g in loaded["data"]["groups"] for r in g["rules"]}
    expected = {r.get("alert") or r["record"] for g in shipped["groups"] for r in g["rules"]}
    assert names == expected

"""Every metric the platform defines follows llmops_<component>_<what>_<unit>, with bounded labels.

Label values must come from small sets (tenants, models, statuses, reasons), never from what a
caller sends freely: API keys, prompts or request ids as labels would leak secrets and grow the
series count without bound. Labels are checked against an allowlist; adding one is a decision.
"""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from llmops_gateway.metrics import GatewayMetrics
from llmops_operator.metrics import OperatorMetrics
from llmops_services.metrics import SPECS, MetricSpec

NAME = re.compile(r"^llmops_(gateway|operator|router|encoder)_[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# Base units; a histogram of how many things counts in the thing (texts per encoder batch).
UNITS = ("_seconds", "_bytes", "_tokens", "_ratio", "_texts")
# Label -> where its values come from (all bounded by configuration or code).
ALLOWED_LABELS = {
    "endpoint": "the gateway's routes",
    "model": "served models (unknown before routing)",
    "tenant": "configured tenants (unknown before authentication)",
    "status": "HTTP status codes",
    "direction": "prompt | completion",
    "reason": "fixed reasons in code",
    "mode": "Redis failure mode",
    "trigger": "change | converge | resync",
    "result": "reconcile outcomes",
    "kind": "child kinds",
    "action": "created | patched | deleted",
    "state": "Ready | NotReady | Invalid",
    "namespace": "namespaces with LLMDeployments",
    "deployment": "LLMDeployments",
    "policy": "routing policies (fixed in code)",
    "target": "models in the graph config",
    "outcome": "how a hold ended: served | expired | cancelled",
}
FORBIDDEN = re.compile(r"key|token|prompt|request_id|user|message|content|text|body|ip", re.I)


def registries() -> dict[str, CollectorRegistry]:
    return {
        "gateway": GatewayMetrics.create().registry,
        "operator": OperatorMetrics.create().registry,
    }


def problems(registry: CollectorRegistry) -> list[str]:
    found = []
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        if not NAME.match(name):
            found.append(f"{name}: not llmops_<component>_<what>_<unit>")
        if family.type == "counter" and not name.endswith("_total"):
            found.append(f"{name}: a counter must end in _total")
        if family.type == "histogram" and not name.endswith(UNITS):
            found.append(f"{name}: a histogram must end in a base unit {UNITS}")
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le", "quantile"}
        for label in _declared_labels(registry, family.name):
            labels.add(label)
        for label in sorted(labels):
            if label not in ALLOWED_LABELS or FORBIDDEN.search(label):
                found.append(f"{name}: label {label!r} is not an allowed, bounded label")
    return found


def _declared_labels(registry: CollectorRegistry, name: str) -> tuple[str, ...]:
    """Label names a metric declares, even before any sample exists."""
    for collector in list(registry._collector_to_names):  # no public accessor
        if name in registry._collector_to_names[collector]:
            return tuple(getattr(collector, "_labelnames", ()))
    return ()


@pytest.mark.parametrize("component", ["gateway", "operator"])
def test_metric_names_and_labels(component: str) -> None:
    registry = registries()[component]
    assert list(registry.collect()), "no metrics found"
    assert problems(registry) == []


def spec_problems(spec: MetricSpec) -> list[str]:
    """The same rules for a metric the graph's deployments record through Ray (which adds
    ``ray_`` and, to counters, ``_total``)."""
    found = []
    if not NAME.match(spec.name + ("_total" if spec.kind == "counter" else "")):
        found.append(f"{spec.name}: not llmops_<component>_<what>_<unit>")
    if spec.kind == "counter" and spec.name.endswith("_total"):
        found.append(f"{spec.name}: Ray adds _total to counters itself")
    if spec.kind == "histogram" and not spec.name.endswith(UNITS):
        found.append(f"{spec.name}: a histogram must end in a base unit {UNITS}")
    if spec.kind == "histogram" and not spec.boundaries:
        found.append(f"{spec.name}: a histogram needs bucket boundaries")
    for label in spec.tags:
        if label not in ALLOWED_LABELS or FORBIDDEN.search(label):
            found.append(f"{spec.name}: label {label!r} is not an allowed, bounded label")
    return found


def test_graph_metric_names_and_labels() -> None:
    assert {spec.name.split("_")[1] for spec in SPECS} == {"router", "encoder"}
    assert [p for spec in SPECS for p in spec_problems(spec)] == []


def test_the_graph_check_catches_bad_specs() -> None:
    bad = [
        MetricSpec("router_decisions", "counter", "no prefix"),
        MetricSpec("llmops_router_decisions_total", "counter", "suffix twice"),
        MetricSpec("llmops_encoder_latency", "histogram", "no unit", boundaries=(1.0,)),
        MetricSpec("llmops_router_calls", "counter", "prompts as labels", ("prompt",)),
    ]
    found = "\n".join(p for spec in bad for p in spec_problems(spec))
    for expected in ("router_decisions: not", "adds _total", "latency: a histogram", "'prompt'"):
        assert expected in found


def test_the_check_catches_bad_names_and_unbounded_labels() -> None:
    from prometheus_client import Counter, Gauge, Histogram

    registry = CollectorRegistry()
    Counter("gateway_requests", "no prefix", registry=registry)
    Histogram("llmops_gateway_latency", "no unit", registry=registry)
    Gauge("llmops_gateway_callers", "keys as labels", ["api_key"], registry=registry)
    Counter("llmops_gateway_prompts_total", "prompts as labels", ["prompt"], registry=registry)
    Counter("llmops_gateway_calls_total", "ids as labels", ["request_id"], registry=registry)
    found = "\n".join(problems(registry))
    for expected in (
        "gateway_requests_total: not",
        "latency: a histogram",
        "'api_key'",
        "'prompt'",
        "'request_id'",
    ):
        assert expected in found

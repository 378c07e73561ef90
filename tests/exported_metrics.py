"""The series names the platform's own processes export, and the llmops_ names a text uses."""

from __future__ import annotations

import re

from llmops_gateway.metrics import GatewayMetrics
from llmops_operator.metrics import OperatorMetrics
from llmops_services.metrics import SPECS

SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
# A label the PodMonitors add to Ray's series: not a metric of ours.
LABELS = {"llmops_deployment"}


def exported() -> set[str]:
    """Every series name the gateway and operator registries and the graph's deployments
    (through Ray) can produce."""
    names = set()
    for registry in (GatewayMetrics.create().registry, OperatorMetrics.create().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + end for end in SUFFIXES.get(family.type, []))
    for spec in SPECS:
        names.update(spec.exported)
    return names


def used_in(text: str) -> set[str]:
    """The llmops_ metric names a rule file or a set of queries refers to."""
    return set(re.findall(r"\b((?:ray_)?llmops_[a-z_]+)\b", text)) - LABELS

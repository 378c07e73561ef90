"""Reading the gateway's Prometheus metrics in tests."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def settled_tokens(metrics_url: str, tenant: str, direction: str = "completion") -> float:
    """``llmops_gateway_tokens_total`` of one tenant (all models) and direction."""
    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "llmops_gateway_tokens_total"
                and sample.labels.get("tenant") == tenant
                and sample.labels.get("direction") == direction
            ):
                total += sample.value
    return total


def wait_settled(metrics_url: str, tenant: str, expected: float, timeout_s: float = 10) -> float:
    """Polls until the tenant's settled completion tokens reach ``expected``; returns them.

    Settlement runs after the response, so it may land a moment after the client is done.
    """
    deadline = time.monotonic() + timeout_s
    value = settled_tokens(metrics_url, tenant)
    while value < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = settled_tokens(metrics_url, tenant)
    return value

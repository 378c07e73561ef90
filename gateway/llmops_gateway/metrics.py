"""Gateway metrics, registered when the app is built (never at import).

Labels are bounded: model names come from the routing table ("unknown" before routing),
tenants from the key store; never keys, prompts or request ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmops_contract import HELD_REQUESTS_METRIC

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HOLD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 600)
"""Hold times: up to a vLLM cold start (model load and warm-up) and the longest hold."""


@dataclass(frozen=True)
class GatewayMetrics:
    """All metrics of one gateway process."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    ttft: Histogram
    tokens: Counter
    rejections: Counter
    in_flight: Gauge
    streams: Gauge
    redis_errors: Counter
    gpu_seconds: Counter
    held: Gauge
    hold_seconds: Histogram

    _children: dict[tuple[str, ...], tuple[Any, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )
    """The labelled children each request updates, by label values: `labels` costs more than
    the update itself. As many as the metrics' own children (the same label values)."""

    def record(self, endpoint: str, model: str, tenant: str, status: int, started: float) -> None:
        """Counts one finished request and observes its latency since ``started``."""
        key = ("request", endpoint, model, tenant, str(status))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(endpoint=endpoint, model=model, tenant=tenant, status=key[4]),
                self.latency.labels(endpoint=endpoint, model=model),
            )
        children[0].inc()
        children[1].observe(time.monotonic() - started)

    def count_tokens(self, tenant: str, model: str, prompt: int, completion: int) -> None:
        """Counts one request's settled tokens."""
        key = ("tokens", tenant, model)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.tokens.labels(tenant=tenant, model=model, direction="prompt"),
                self.tokens.labels(tenant=tenant, model=model, direction="completion"),
            )
        children[0].inc(prompt)
        children[1].inc(completion)

    @classmethod
    def create(cls) -> GatewayMetrics:
        """Makes a fresh registry holding the gateway's metrics."""
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "llmops_gateway_requests_total",
                "Requests by endpoint, model, tenant and HTTP status.",
                ["endpoint", "model", "tenant", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "llmops_gateway_request_duration_seconds",
                "Time from request to the last byte of the response.",
                ["endpoint", "model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            ttft=Histogram(
                "llmops_gateway_time_to_first_token_seconds",
                "Time from request to the first streamed content chunk.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            tokens=Counter(
                "llmops_gateway_tokens_total",
                "Tokens settled, by tenant, model and direction (prompt or completion).",
                ["tenant", "model", "direction"],
                registry=registry,
            ),
            rejections=Counter(
                "llmops_gateway_rate_limit_rejections_total",
                "Requests refused by admission, by tenant and reason.",
                ["tenant", "reason"],
                registry=registry,
            ),
            in_flight=Gauge(
                "llmops_gateway_in_flight_requests",
                "Requests being processed.",
                registry=registry,
            ),
            streams=Gauge(
                "llmops_gateway_open_streams",
                "Streaming responses being relayed.",
                registry=registry,
            ),
            redis_errors=Counter(
                "llmops_gateway_redis_errors_total",
                "Admission calls that failed because Redis was unreachable, by failure mode.",
                ["mode"],
                registry=registry,
            ),
            gpu_seconds=Counter(
                "llmops_gateway_gpu_seconds_total",
                "GPU-seconds charged to requests of GPU models (latency x GPUs per replica / "
                "sequences per replica, as in the usage records), by tenant and model.",
                ["tenant", "model"],
                registry=registry,
            ),
            held=Gauge(
                HELD_REQUESTS_METRIC,
                "Requests held now for a model with no serving replica (scaled to zero or "
                "starting), by model; KEDA wakes the model on their sum over replicas.",
                ["model"],
                registry=registry,
            ),
            hold_seconds=Histogram(
                "llmops_gateway_hold_seconds",
                "How long requests were held for a model with no serving replica, by model "
                "and outcome: served (relayed once it served), expired (503 past the hold "
                "deadline) or cancelled (the client left).",
                ["model", "outcome"],
                buckets=HOLD_BUCKETS,
                registry=registry,
            ),
        )

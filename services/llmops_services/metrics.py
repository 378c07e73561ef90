"""Metrics of the router and encoder deployments, exported through Ray's metrics agent.

Ray Serve replicas are separate processes, so they record through `ray.serve.metrics`; Ray's
agent on each node serves them to Prometheus with a ``ray_`` prefix (counters also get
``_total``), and adds the Serve labels (deployment, replica, application). vLLM's own engine
metrics reach Prometheus the same way (``ray_vllm_*``). Label values here are bounded: model
names from the graph config and a fixed set of routing policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmops_services.routing import RouteDecision

SCORE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


@dataclass(frozen=True)
class MetricSpec:
    """One metric as a deployment declares it (Ray adds the prefix and the counter suffix)."""

    name: str
    kind: str  # counter | histogram | gauge
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> list[str]:
        """The series names Prometheus sees for it."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return [f"{base}_total"]
        if self.kind == "histogram":
            return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
        return [base]

    def create(self) -> Any:
        from ray.serve import metrics

        if self.kind == "counter":
            return metrics.Counter(self.name, self.description, tag_keys=self.tags)
        if self.kind == "histogram":
            return metrics.Histogram(
                self.name, self.description, list(self.boundaries), tag_keys=self.tags
            )
        return metrics.Gauge(self.name, self.description, tag_keys=self.tags)


ROUTER_DECISIONS = MetricSpec(
    "llmops_router_decisions",
    "counter",
    "Requests routed, by policy (name, semantic, semantic_fallback, default) and target model.",
    ("policy", "target"),
)
ROUTER_SIMILARITY = MetricSpec(
    "llmops_router_semantic_similarity_ratio",
    "histogram",
    "Best cosine similarity between an `auto` prompt and a route example, by chosen model.",
    ("target",),
    tuple(SCORE_BUCKETS),
)
ENCODER_BATCH_TEXTS = MetricSpec(
    "llmops_encoder_batch_texts",
    "histogram",
    "Texts embedded together in one adaptive batch.",
    boundaries=tuple(BATCH_BUCKETS),
)
ENCODER_BATCH_DURATION = MetricSpec(
    "llmops_encoder_batch_duration_seconds",
    "histogram",
    "Time to embed one batch.",
    boundaries=tuple(DURATION_BUCKETS),
)
ENCODER_INPUT_TOKENS = MetricSpec(
    "llmops_encoder_input_tokens", "counter", "Tokens embedded (after truncation)."
)
SPECS = (
    ROUTER_DECISIONS,
    ROUTER_SIMILARITY,
    ENCODER_BATCH_TEXTS,
    ENCODER_BATCH_DURATION,
    ENCODER_INPUT_TOKENS,
)


class RouterMetrics:
    """The router's metrics; create inside the replica (Ray metrics need a running worker)."""

    def __init__(self) -> None:
        self._decisions = ROUTER_DECISIONS.create()
        self._score = ROUTER_SIMILARITY.create()

    def routed(self, decision: RouteDecision) -> None:
        """Counts one routing decision; semantic ones also record their score."""
        self._decisions.inc(1, tags={"policy": decision.policy, "target": decision.model})
        if decision.policy.startswith("semantic"):
            self._score.observe(decision.score, tags={"target": decision.model})


class EncoderMetrics:
    """The encoder's metrics; create inside the replica."""

    def __init__(self) -> None:
        self._batch_size = ENCODER_BATCH_TEXTS.create()
        self._duration = ENCODER_BATCH_DURATION.create()
        self._tokens = ENCODER_INPUT_TOKENS.create()

    def batch(self, size: int, seconds: float, tokens: int) -> None:
        """Records one embedded batch."""
        self._batch_size.observe(size)
        self._duration.observe(seconds)
        if tokens:
            self._tokens.inc(tokens)

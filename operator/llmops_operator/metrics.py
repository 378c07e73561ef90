"""Operator metrics, registered when the operator starts (never at import)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class OperatorMetrics:
    """All metrics of one operator process."""

    registry: CollectorRegistry
    reconciles: Counter
    errors: Counter
    duration: Histogram
    changes: Counter
    deployments: Gauge
    desired_replicas: Gauge
    ready_replicas: Gauge
    model_replicas: Gauge
    _states: dict[tuple[str, str], str] = field(default_factory=dict)
    _models: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def set_state(self, namespace: str, name: str, state: str | None) -> None:
        """Tracks one LLMDeployment's state (Ready, NotReady, Invalid); None forgets it."""
        key = (namespace, name)
        if state is None:
            self._states.pop(key, None)
            for gauge in (self.desired_replicas, self.ready_replicas):
                with contextlib.suppress(KeyError):  # never reported
                    gauge.remove(namespace, name)
            self.set_model_replicas(namespace, name, {})
        else:
            self._states[key] = state
        counts: dict[str, int] = {"Ready": 0, "NotReady": 0, "Invalid": 0}
        for value in self._states.values():
            counts[value] = counts.get(value, 0) + 1
        for value, count in counts.items():
            self.deployments.labels(state=value).set(count)

    def set_replicas(self, namespace: str, name: str, desired: int, ready: int) -> None:
        """Replicas one LLMDeployment asks for and serves (alert: stuck below desired)."""
        self.desired_replicas.labels(namespace=namespace, deployment=name).set(desired)
        self.ready_replicas.labels(namespace=namespace, deployment=name).set(ready)

    def set_model_replicas(
        self, namespace: str, name: str, models: dict[str, tuple[int, int]]
    ) -> None:
        """Each model's (desired, ready) replicas; models no longer listed are forgotten.

        Kube-state-metrics cannot see custom resources, so the per-model counts (scaled to
        zero included) are exported here for dashboards and alerts.
        """
        key = (namespace, name)
        for gone in self._models.get(key, set()) - set(models):
            for state in ("desired", "ready"):
                with contextlib.suppress(KeyError):
                    self.model_replicas.remove(namespace, name, gone, state)
        for model, (desired, ready) in models.items():
            for state, value in (("desired", desired), ("ready", ready)):
                self.model_replicas.labels(
                    namespace=namespace, deployment=name, model=model, state=state
                ).set(value)
        if models:
            self._models[key] = set(models)
        else:
            self._models.pop(key, None)

    @classmethod
    def create(cls) -> OperatorMetrics:
        """Makes a fresh registry holding the operator's metrics."""
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            reconciles=Counter(
                "llmops_operator_reconciles_total",
                "Reconcile passes by trigger and result.",
                ["trigger", "result"],
                registry=registry,
            ),
            errors=Counter(
                "llmops_operator_reconcile_errors_total",
                "Failed reconcile passes by reason.",
                ["reason"],
                registry=registry,
            ),
            duration=Histogram(
                "llmops_operator_reconcile_duration_seconds",
                "Time of one reconcile pass.",
                ["trigger"],
                buckets=DURATION_BUCKETS,
                registry=registry,
            ),
            changes=Counter(
                "llmops_operator_child_changes_total",
                "Children created, patched or deleted, by kind and action.",
                ["kind", "action"],
                registry=registry,
            ),
            deployments=Gauge(
                "llmops_operator_deployments",
                "LLMDeployments by state.",
                ["state"],
                registry=registry,
            ),
            desired_replicas=Gauge(
                "llmops_operator_desired_replicas",
                "Replicas an LLMDeployment asks for: the fewest over its models (each model's "
                "LLMModel count, KEDA's choice).",
                ["namespace", "deployment"],
                registry=registry,
            ),
            ready_replicas=Gauge(
                "llmops_operator_ready_replicas",
                "Serve replicas an LLMDeployment serves with (status.replicas).",
                ["namespace", "deployment"],
                registry=registry,
            ),
            model_replicas=Gauge(
                "llmops_operator_model_replicas",
                "Replicas of one model: desired (its LLMModel's spec.replicas, KEDA's choice) "
                "and ready (serving).",
                ["namespace", "deployment", "model", "state"],
                registry=registry,
            ),
        )

"""The environment that turns the serving graph's OpenTelemetry tracing on.

Whoever starts Ray processes sets it (`llmops up` locally, the operator in every Ray pod of a
cluster); the graph (llmops_services.tracing) reads it. Ray Serve turns tracing on from
``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` and ``RAY_SERVE_TRACING_SAMPLING_RATIO``
(ray/serve/_private/tracing_utils.py); the OTLP exporter and vLLM read the ``OTEL_*`` ones.
"""

from __future__ import annotations

EXPORTER_IMPORT_PATH = "llmops_services.tracing:otlp_span_processors"
"""The hook Ray Serve calls for its span processors (an OTLP/HTTP exporter)."""
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
SERVICE_NAME = "llmops-graph"
"""The resource name the graph's spans carry."""


def tracing_env(endpoint: str, sample: float) -> dict[str, str]:
    """The environment that turns the graph's tracing on (every Ray process must have it).

    Args:
        endpoint: OTLP/HTTP traces URL, e.g. ``http://otel-collector:4318/v1/traces``.
        sample: Share of new traces recorded; requests with a sampled parent always are.
    """
    return {
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": EXPORTER_IMPORT_PATH,
        "RAY_SERVE_TRACING_SAMPLING_RATIO": str(sample),
        ENDPOINT_ENV: endpoint,
        # vLLM's exporter speaks gRPC unless told otherwise (vllm/tracing/otel.py).
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": SERVICE_NAME,
    }

"""OpenTelemetry traces of the serving graph, joined to the gateway's through ``traceparent``.

Ray Serve does the plumbing (ray/serve/_private/tracing_utils.py): with tracing on, its HTTP
ingress continues the ``traceparent`` the gateway forwards, each replica opens a
``replica_handle_request <deployment> <method>`` span, and handle calls carry the caller's
context to the next replica. Ray turns it on from its environment in every replica:

- ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` = `EXPORTER_IMPORT_PATH`, the hook below, which
  sends spans over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (read by the exporter);
- ``RAY_SERVE_TRACING_SAMPLING_RATIO``: the share of new traces recorded (parent-based: a
  request the gateway sampled is recorded whatever the ratio);
- ``OTEL_SERVICE_NAME``: the resource name the graph's spans carry;
- ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` ``http/protobuf``, for vLLM's exporter.

`tracing_env` (llmops_contract.tracing) builds that environment. On top of Ray's spans, the
router adds a ``route`` span (requested and routed model, policy) and each LLM deployment a
GenAI span around its engine call (``chat <model>``: ``gen_ai.*`` attributes, time to first
chunk), whose context it hands to vLLM, which with ``otlp_traces_endpoint`` (set from the
same variable) records its own ``llm_request`` span (queue, prefill and decode times) in the
same trace.

Off (no exporter configured), Ray installs no tracer provider, and these helpers make no span.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmops_contract.tracing import ENDPOINT_ENV, tracing_env

__all__ = [
    "engine_traces_endpoint",
    "otlp_span_processors",
    "trace_headers",
    "tracer",
    "tracing_env",
]


OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
MAX_TOKENS = "gen_ai.request.max_tokens"
TIME_TO_FIRST_CHUNK = "gen_ai.server.time_to_first_token"

_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_span_processors() -> list[SpanProcessor]:
    """Ray Serve's tracing exporter hook: a batching OTLP/HTTP exporter to ``ENDPOINT_ENV``."""
    return [BatchSpanProcessor(OTLPSpanExporter())]


def tracer() -> trace.Tracer | None:
    """The graph's tracer when tracing is on in this process (Ray set a provider), else None."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    return provider.get_tracer("llmops.services")


def trace_headers(span: trace.Span) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) naming ``span``, for a call made under it."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def engine_traces_endpoint() -> str | None:
    """Where vLLM sends its own spans: the graph's endpoint, when tracing is on."""
    if not os.environ.get("RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"):
        return None
    return os.environ.get(ENDPOINT_ENV) or None

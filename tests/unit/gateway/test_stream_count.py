"""What the relay counts as generated tokens in an SSE stream."""

from __future__ import annotations

from llmops_gateway.core import content_chunks


def _chunk(delta: str) -> bytes:
    return b'data: {"id":"x","choices":[{"index":0,"delta":{' + delta.encode() + b"}}]}\n\n"


def test_the_role_only_chunk_is_not_a_token() -> None:
    events = _chunk('"role":"assistant","content":""') + _chunk('"content":"Paris"')
    assert content_chunks(events) == 1


def test_every_chunk_with_text_counts_once() -> None:
    events = b"".join(_chunk(f'"content":"{word}"') for word in ("a", "b", r"\"q\"", " "))
    assert content_chunks(events) == 4


def test_completions_chunks_count_by_text() -> None:
    events = b'data: {"choices":[{"text":"tok "}]}\n\ndata: {"choices":[{"text":""}]}\n\n'
    assert content_chunks(events) == 1


def test_usage_and_done_are_no_tokens() -> None:
    events = b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n'
    assert content_chunks(events) == 0

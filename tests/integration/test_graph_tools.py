"""Tool calling end to end: the `openai` client through `llmops up`'s gateway to the graph,
on the test graph's model with vLLM's ``hermes`` tool parser and auto tool choice set through
``engine.extra_args`` (tests/graph.yaml)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import RunningGraph

pytestmark = pytest.mark.slow

TOOLS_MODEL = "smollm2-coding"
"""The test graph's model with ``tool_call_parser: hermes`` and ``enable_auto_tool_choice``."""
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        # OpenAI's strict mode: vLLM then forces the arguments to the schema (with the default
        # tool_strict_level, vllm/tool_parsers/tool_strict_level.py), so even a 135M model's
        # arguments parse.
        "strict": True,
        "parameters": {
            "type": "object",
            # An enum keeps a 135M model's guided output short and the test deterministic.
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Cairo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(graph: RunningGraph) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{graph.url}/v1", api_key=graph.key, max_retries=0)


def _check_weather_arguments(arguments: str) -> None:
    parsed = json.loads(arguments)
    assert set(parsed) == {"city", "unit"}
    assert parsed["city"] in {"Paris", "London", "Cairo"}
    assert parsed["unit"] in {"celsius", "fahrenheit"}


def test_named_tool_choice_returns_parseable_arguments(client: openai.OpenAI) -> None:
    """With a structural-tag parser (hermes), vLLM forces a named call's envelope and, for a
    strict function, its arguments' JSON schema (vllm/tool_parsers/structural_tag_registry.py,
    ``_hermes_style_structural_tag``)."""
    reply = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice=NAMED,
        temperature=0,
        max_tokens=64,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls is not None, reply
    assert len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert calls[0].id
    _check_weather_arguments(calls[0].function.arguments)


def test_required_tool_choice_calls_a_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=96,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls, reply
    assert all(call.function.name == "get_weather" for call in calls)
    for call in calls:
        _check_weather_arguments(call.function.arguments)


def test_auto_tool_choice_is_served_with_the_parser_set(client: openai.OpenAI) -> None:
    """Without ``enable_auto_tool_choice`` and a parser vLLM answers 400 to ``auto``; with
    them it answers, with text or with tool calls the hermes parser found."""
    reply = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="auto",
        temperature=0,
        max_tokens=48,
    )
    choice = reply.choices[0]
    assert choice.finish_reason in {"stop", "length", "tool_calls"}
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert choice.message.content


def test_auto_tool_choice_is_refused_on_a_model_without_a_parser(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="smollm2-geography",
            messages=MESSAGES,
            tools=[WEATHER],
            tool_choice="auto",
            max_tokens=8,
        )
    assert "tool" in str(refused.value)


def test_streamed_named_tool_call_relays_argument_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice=NAMED,
        temperature=0,
        max_tokens=64,
        stream=True,
    )
    names: list[str] = []
    pieces: list[str] = []
    deltas = 0
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                if call.function is None:
                    continue
                if call.function.name:
                    names.append(call.function.name)
                if call.function.arguments:
                    deltas += 1
                    pieces.append(call.function.arguments)
    assert names == ["get_weather"]
    assert deltas > 1  # relayed as it was generated, not in one piece
    _check_weather_arguments("".join(pieces))

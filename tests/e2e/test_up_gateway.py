"""`llmops up` end to end: the official openai client, through the gateway, to the real graph."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import RunningGraph

pytestmark = pytest.mark.slow

GEO = "smollm2-geography"


@pytest.fixture(scope="module")
def client(graph: RunningGraph) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{graph.url}/v1", api_key=graph.key, max_retries=0)


def test_chat_through_the_gateway(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=GEO,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=40,
    )
    assert "Paris" in (reply.choices[0].message.content or "")


def test_streaming_through_the_gateway_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=GEO,
            messages=[{"role": "user", "content": "List three fruits."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
    assert chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 16


def test_completions_and_embeddings_through_the_gateway(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=GEO, prompt="Hello,", max_tokens=4)
    assert completion.choices[0].text
    vectors = client.embeddings.create(model="all-minilm-l6-v2", input=["a", "b"])
    assert [len(d.embedding) for d in vectors.data] == [384, 384]


def test_models_and_semantic_routing_through_the_gateway(
    graph: RunningGraph, client: openai.OpenAI
) -> None:
    assert "auto" in {m.id for m in client.models.list()}
    response = httpx.post(
        f"{graph.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {graph.key}"},
        json={
            "model": "auto",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "Write a Python function to add."}],
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "smollm2-coding"


def test_graph_errors_pass_through_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(
            model=GEO, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=5
        )


def test_the_gateway_refuses_calls_without_the_key(graph: RunningGraph) -> None:
    unkeyed = openai.OpenAI(base_url=f"{graph.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unkeyed.models.list()

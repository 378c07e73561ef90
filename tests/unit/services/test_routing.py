"""Semantic routing decisions on hand-made vectors."""

from __future__ import annotations

import math

import pytest

from llmops_services.routing import cosine, prompt_text, route_by_similarity


def test_cosine_of_known_vectors() -> None:
    assert cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([1, 1], [-1, -1]) == pytest.approx(-1.0)
    assert cosine([3, 4], [4, 3]) == pytest.approx(24 / 25)
    assert cosine([0, 0], [1, 0]) == 0.0


def test_cosine_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        cosine([1, 0], [1, 0, 0])


def test_nearest_example_wins() -> None:
    routes = {
        "geo": [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]],
        "code": [[0.0, 1.0, 0.0]],
    }
    decision = route_by_similarity([0.2, 0.9, 0.1], routes, default_model="geo")
    assert decision.model == "code"
    assert not decision.fallback
    assert decision.policy == "semantic"
    assert decision.score == pytest.approx(cosine([0.2, 0.9, 0.1], [0.0, 1.0, 0.0]))


def test_best_single_example_counts_not_the_average() -> None:
    routes = {"a": [[1.0, 0.0], [-1.0, 0.0]], "b": [[0.6, 0.8]]}
    assert route_by_similarity([1.0, 0.0], routes, default_model="b").model == "a"


def test_threshold_falls_back_to_default() -> None:
    routes = {"a": [[1.0, 0.0]]}
    decision = route_by_similarity([0.0, 1.0], routes, default_model="chat", min_similarity=0.5)
    assert decision.model == "chat"
    assert decision.fallback
    assert decision.policy == "semantic_fallback"
    assert decision.score == pytest.approx(0.0)


def test_no_routes_falls_back_with_zero_score() -> None:
    decision = route_by_similarity([1.0], {}, default_model="chat")
    assert (decision.model, decision.fallback, decision.score) == ("chat", True, 0.0)
    decision = route_by_similarity([1.0], {"a": []}, default_model="chat")
    assert decision.fallback
    assert not math.isinf(decision.score)


def test_ties_go_to_the_model_listed_first() -> None:
    routes = {"first": [[1.0, 0.0]], "second": [[1.0, 0.0]]}
    assert route_by_similarity([1.0, 0.0], routes, default_model="x").model == "first"


def test_prompt_text_takes_the_last_user_message() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url"}]},
    ]
    assert prompt_text(messages) == "second"
    assert prompt_text([{"role": "system", "content": "x"}]) == ""

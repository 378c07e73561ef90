"""`auto` routing: one matrix product per prompt, the threshold, and conversations that stay
on the model they started on (the router's `resolve_model` over a fake encoder handle)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import MethodType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from llmops_contract import GraphConfig
from llmops_services.router import Router
from llmops_services.routing import (
    DecisionCache,
    RouteDecision,
    RouteIndex,
    conversation_text,
    cosine,
    route_by_similarity,
)

GEO, CODE = "smollm2-geography", "smollm2-coding"
VECTORS = {
    "capital of France": [1.0, 0.0, 0.0],
    "river in Cairo": [0.9, 0.1, 0.0],
    "reverse a string in Python": [0.0, 1.0, 0.0],
    "fix my segfault": [0.1, 0.9, 0.1],
    "sort a list in Python": [0.1, 0.95, 0.0],
    "now the capital of Spain": [0.95, 0.05, 0.0],
    "bake bread": [0.0, 0.0, 1.0],
}


def test_index_scores_every_model_in_one_product() -> None:
    rng = np.random.default_rng(0)
    routes = {
        "a": rng.normal(size=(5, 8)).tolist(),
        "empty": [],
        "b": rng.normal(size=(3, 8)).tolist(),
    }
    prompts = rng.normal(size=(4, 8))
    index = RouteIndex(routes)
    assert index.models == ("a", "b")
    scores = index.scores(prompts)
    assert scores.shape == (4, 2)
    for row, prompt in enumerate(prompts.tolist()):
        for column, model in enumerate(index.models):
            best = max(cosine(prompt, example) for example in routes[model])
            assert scores[row, column] == pytest.approx(best, abs=1e-5)


def test_index_route_matches_the_loop_and_applies_the_threshold() -> None:
    routes = {"geo": [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]], "code": [[0.0, 1.0, 0.0]]}
    decision = RouteIndex(routes).route([0.2, 0.9, 0.1], "geo")
    assert (decision.model, decision.policy) == ("code", "semantic")
    assert decision.score == pytest.approx(cosine([0.2, 0.9, 0.1], [0.0, 1.0, 0.0]), abs=1e-6)
    low = route_by_similarity([0.0, 0.0, 1.0], routes, "chat", min_similarity=0.3)
    assert (low.model, low.policy, low.score) == ("chat", "semantic_fallback", 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        RouteIndex(routes).route([1.0, 0.0], "geo")


def test_decision_cache_keeps_the_most_recent() -> None:
    cache = DecisionCache(size=2)
    for text in ("a", "b"):
        cache.put(text, RouteDecision(text, 1.0))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", RouteDecision("c", 1.0))
    assert (cache.get("b"), len(cache)) == (None, 2)
    decision = cache.get("a")
    assert decision is not None
    assert decision.model == "a"


def test_conversation_text_is_the_first_user_message() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image_url"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    assert conversation_text(messages) == "first"
    assert conversation_text([{"role": "system", "content": "x"}]) == ""


class _Remote:
    def __init__(self, calls: list[list[str]]) -> None:
        self.calls = calls

    async def remote(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        self.calls.append(list(texts))
        return [VECTORS[text] for text in texts], len(texts)


class _Encoder:
    """The encoder deployment's handle: ``embed.remote(texts)`` answers the fixed vectors."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.embed = _Remote(self.calls)


def _router(encoder: _Encoder, min_similarity: float = 0.5) -> Any:
    """A Router's routing state and methods, without Serve (``__init__`` imports vLLM's
    request models, seconds of CPU)."""
    config = GraphConfig.model_validate(
        {
            "llms": [
                {
                    "name": GEO,
                    "source": "embedded://smollm2-135m-instruct",
                    "route_examples": ["capital of France", "river in Cairo"],
                },
                {
                    "name": CODE,
                    "source": "embedded://smollm2-135m-instruct",
                    "route_examples": ["reverse a string in Python", "fix my segfault"],
                },
            ],
            "router": {"min_similarity": min_similarity, "default_model": GEO},
        }
    )
    router = SimpleNamespace(
        config=config,
        llms={GEO: object(), CODE: object()},
        adapters={},  # LoRA adapter name -> base model (none here)
        encoder=encoder,
        semantic_enabled=True,
        _route_index=None,
        _route_lock=asyncio.Lock(),
        _decisions=DecisionCache(),
    )
    router._routes = MethodType(Router._routes, router)
    router.resolve_model = MethodType(Router.resolve_model, router)
    return router


def _resolve(router: Any, messages: list[dict[str, str]]) -> RouteDecision:
    decision: RouteDecision = asyncio.run(router.resolve_model("auto", conversation_text(messages)))
    return decision


def test_a_conversation_stays_on_the_model_it_started_on() -> None:
    encoder = _Encoder()
    router = _router(encoder)
    first = [{"role": "user", "content": "sort a list in Python"}]
    assert _resolve(router, first).model == CODE
    follow_up = [
        *first,
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": "now the capital of Spain"},
    ]
    decision = _resolve(router, follow_up)
    assert (decision.model, decision.policy) == (CODE, "semantic")
    # The route examples were embedded in one call, the conversation once.
    assert encoder.calls == [
        ["sort a list in Python"],
        ["capital of France", "river in Cairo", "reverse a string in Python", "fix my segfault"],
    ]
    # Another router replica, with nothing cached, decides the same.
    assert _resolve(_router(_Encoder()), follow_up).model == CODE
    # The same follow-up opening a new conversation goes to geography.
    assert _resolve(router, follow_up[2:]).model == GEO


def test_a_prompt_below_the_threshold_goes_to_the_default_model() -> None:
    decision = _resolve(_router(_Encoder()), [{"role": "user", "content": "bake bread"}])
    assert (decision.model, decision.policy) == (GEO, "semantic_fallback")
    decision = _resolve(_router(_Encoder(), -1.0), [{"role": "user", "content": "bake bread"}])
    assert decision.policy == "semantic"

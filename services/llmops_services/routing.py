"""Semantic routing: pick the LLM whose route examples are nearest to a prompt.

Pure functions over plain vectors, so the router deployment and the unit tests share them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Vector = Sequence[float]


# What decided a request's model: `name` (the request named a served model), `semantic` (the
# nearest route example), `semantic_fallback` (none near enough: the default model), or
# `default` (no model asked, or no semantic router configured).
Policy = Literal["name", "semantic", "semantic_fallback", "default"]


@dataclass(frozen=True)
class RouteDecision:
    """Where a request goes, and why."""

    model: str
    score: float
    """Best cosine similarity between the prompt and one of the model's examples."""
    policy: Policy = "semantic"

    @property
    def fallback(self) -> bool:
        """True when the default model took the request because nothing chose another."""
        return self.policy in ("semantic_fallback", "default")


def cosine(a: Vector, b: Vector) -> float:
    """Cosine similarity of two vectors; 0.0 when either is all zeros.

    Raises:
        ValueError: the vectors differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"vectors differ in length: {len(a)} != {len(b)}")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def route_by_similarity(
    prompt: Vector,
    routes: Mapping[str, Sequence[Vector]],
    default_model: str,
    min_similarity: float = -1.0,
) -> RouteDecision:
    """Chooses the model whose nearest route example is most similar to the prompt.

    Args:
        prompt: The prompt's embedding.
        routes: Model name -> embeddings of its route examples; models without examples are
            not candidates.
        default_model: Used when no model has examples or none reaches ``min_similarity``.
        min_similarity: Lowest best-example similarity that still counts as a match.

    Returns:
        The decision; ties go to the model listed first.
    """
    best_model, best_score = default_model, -math.inf
    for model, examples in routes.items():
        for example in examples:
            score = cosine(prompt, example)
            if score > best_score:
                best_model, best_score = model, score
    if best_score == -math.inf:
        return RouteDecision(default_model, 0.0, policy="semantic_fallback")
    if best_score < min_similarity:
        return RouteDecision(default_model, best_score, policy="semantic_fallback")
    return RouteDecision(best_model, best_score, policy="semantic")


def prompt_text(messages: Sequence[Mapping[str, object]]) -> str:
    """The text semantic routing embeds for a chat: the last user message's text."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = [
                str(part.get("text", ""))
                for part in content
                if isinstance(part, Mapping) and part.get("type") == "text"
            ]
            return " ".join(p for p in parts if p)
    return ""

"""Semantic routing: pick the LLM whose route examples are nearest to a prompt.

Plain vectors and numpy, so the router deployment, the evaluation script
(tests/bench/route_eval.py) and the unit tests share them. `RouteIndex` stacks every route
example's unit vector once; scoring a prompt is then one matrix-vector product.

A conversation stays on the model it started on: `conversation_text` is the text a chat is
routed by, its first user message, which every later turn of the same conversation repeats.
The decision is a function of that text, the route examples and the threshold only, so every
router replica makes the same one without shared state, and `DecisionCache` spares the later
turns the encoder call. A client that wants to pin a conversation explicitly names the model
the first response's ``x-llmops-routed-model`` header gave.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Vector = Sequence[float]
Matrix = npt.NDArray[np.float32]


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


def _unit_rows(rows: npt.ArrayLike) -> Matrix:
    matrix = np.atleast_2d(np.asarray(rows, dtype=np.float32))
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit: Matrix = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    return unit


class RouteIndex:
    """Every model's route-example vectors, stacked once as unit rows.

    Args:
        routes: Model name -> embeddings of its route examples; models without examples are
            not candidates. All vectors have one width.

    Raises:
        ValueError: the vectors differ in width.
    """

    def __init__(self, routes: Mapping[str, Sequence[Vector]]) -> None:
        self.models = tuple(model for model, examples in routes.items() if len(examples))
        blocks = [_unit_rows(routes[model]) for model in self.models]
        if len({block.shape[1] for block in blocks}) > 1:
            raise ValueError("route example vectors differ in width")
        self._matrix: Matrix = (
            np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)
        )
        sizes = [block.shape[0] for block in blocks]
        self._starts = np.cumsum([0, *sizes[:-1]]) if sizes else np.zeros(0, dtype=np.int64)

    def scores(self, prompts: npt.ArrayLike) -> Matrix:
        """Each prompt's best cosine similarity per model, in `models` order.

        Args:
            prompts: One prompt vector, or a ``(prompts, width)`` matrix of them.

        Returns:
            ``(prompts, models)``: one matrix product against all examples, then the best
            example of each model.

        Raises:
            ValueError: a prompt's width differs from the examples'.
        """
        unit = _unit_rows(prompts)
        if not self.models:
            return np.zeros((unit.shape[0], 0), dtype=np.float32)
        if unit.shape[1] != self._matrix.shape[1]:
            raise ValueError(
                f"vectors differ in length: {unit.shape[1]} != {self._matrix.shape[1]}"
            )
        similarities = unit @ self._matrix.T
        best: Matrix = np.maximum.reduceat(similarities, self._starts, axis=1)
        return best

    def route(
        self, prompt: Vector, default_model: str, min_similarity: float = -1.0
    ) -> RouteDecision:
        """Chooses the model whose nearest route example is most similar to the prompt.

        Args:
            prompt: The prompt's embedding.
            default_model: Used when no model has examples or none reaches ``min_similarity``.
            min_similarity: Lowest best-example similarity that still counts as a match.

        Returns:
            The decision; ties go to the model listed first.
        """
        if not self.models:
            return RouteDecision(default_model, 0.0, policy="semantic_fallback")
        best = self.scores(prompt)[0]
        index = int(np.argmax(best))
        score = float(best[index])
        if score < min_similarity:
            return RouteDecision(default_model, score, policy="semantic_fallback")
        return RouteDecision(self.models[index], score, policy="semantic")


def route_by_similarity(
    prompt: Vector,
    routes: Mapping[str, Sequence[Vector]],
    default_model: str,
    min_similarity: float = -1.0,
) -> RouteDecision:
    """`RouteIndex.route` for routes given once (build a `RouteIndex` to route many prompts)."""
    return RouteIndex(routes).route(prompt, default_model, min_similarity)


class DecisionCache:
    """Routing decisions by a hash of the text they were made for, least recently used out.

    Args:
        size: Most decisions kept.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._decisions: OrderedDict[str, RouteDecision] = OrderedDict()

    @staticmethod
    def key(text: str) -> str:
        """The key of a routed text: its SHA-256, so prompts are not kept in memory."""
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, text: str) -> RouteDecision | None:
        """The decision made for this text, if still kept."""
        key = self.key(text)
        decision = self._decisions.get(key)
        if decision is not None:
            self._decisions.move_to_end(key)
        return decision

    def put(self, text: str, decision: RouteDecision) -> None:
        """Keeps a decision, dropping the least recently used one past ``size``."""
        self._decisions[self.key(text)] = decision
        self._decisions.move_to_end(self.key(text))
        while len(self._decisions) > self.size:
            self._decisions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._decisions)


def _message_text(message: Mapping[str, object]) -> str:
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


def prompt_text(messages: Sequence[Mapping[str, object]]) -> str:
    """The last user message's text."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return _message_text(message)
    return ""


def conversation_text(messages: Sequence[Mapping[str, object]]) -> str:
    """The text semantic routing embeds for a chat: its first user message's text.

    Every turn of a conversation carries its first user message, so routing by it keeps the
    conversation on the model its first turn went to.
    """
    for message in messages:
        if message.get("role") == "user":
            return _message_text(message)
    return ""

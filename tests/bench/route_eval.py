"""Evaluation of semantic `auto` routing on a labelled prompt set (tests/data/route_eval.jsonl).

Each line is ``{"prompt": ..., "label": ...}``: the label is the model of the test graph
(tests/graph.yaml) that should answer, or ``neither`` when no route fits and the default model
should take it through the similarity threshold. The prompts are split per label, with a seed,
into three parts: an examples part, a calibration part and an evaluation part. Two route sets
are scored, both with the graph's encoder (in process, `TextEncoder`) and `RouteIndex` as the
router uses them:

- ``graph``: the graph's own route examples;
- ``graph+examples``: those plus the examples part's labelled prompts.

For each, the threshold (``router.min_similarity``) that maximises macro-F1 on the
calibration part is chosen, and accuracy, macro-F1 and per-label precision/recall on the
evaluation part are reported with that threshold and without one (-1, the contract's default).
The routing decision's time is measured as the router spends it: one prompt's embedding plus the
scoring (the matrix product alone too). With ``--graph-url`` (a running graph, e.g.
``llmops up``'s), the added TTFT of ``auto`` is measured: streamed chats of the evaluation
prompts, each once with ``model: auto`` and once naming the model ``auto`` picked, in
alternating order, ``max_tokens`` 1.

    .venv/bin/python -m tests.bench.route_eval [--graph tests/graph.yaml] [--seed 0]
        [--json docs/bench/route-eval-cpu.json] [--graph-url http://127.0.0.1:8000]

Not a test: results go to docs/benchmarks.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from llmops_contract import AUTO_MODEL, ROUTED_MODEL_HEADER, GraphConfig
from llmops_services.encoder import TextEncoder
from llmops_services.routing import RouteIndex
from llmops_services.sources import resolve_source

NEITHER = "neither"
"""The label of a prompt no route fits: the default model should answer it."""
DATA = Path(__file__).parents[1] / "data" / "route_eval.jsonl"
GRAPH = Path(__file__).parents[1] / "graph.yaml"


@dataclass(frozen=True)
class Labelled:
    """One prompt of the set and the model that should answer it (or `NEITHER`)."""

    prompt: str
    label: str


def load(path: Path) -> list[Labelled]:
    """Reads the JSON-lines prompt set."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Labelled(str(row["prompt"]), str(row["label"])) for row in rows]


def split(
    prompts: Sequence[Labelled], seed: int
) -> tuple[list[Labelled], list[Labelled], list[Labelled]]:
    """Per label, shuffled with ``seed``: the examples, calibration and evaluation parts
    (thirds; a label's remainder goes to evaluation)."""
    rng = random.Random(seed)
    parts: tuple[list[Labelled], list[Labelled], list[Labelled]] = ([], [], [])
    for label in sorted({p.label for p in prompts}):
        group = [p for p in prompts if p.label == label]
        rng.shuffle(group)
        third = len(group) // 3
        parts[0].extend(group[:third])
        parts[1].extend(group[third : 2 * third])
        parts[2].extend(group[2 * third :])
    return parts


def predict(top: Sequence[str], scores: Sequence[float], threshold: float) -> list[str]:
    """The router's choice per prompt: its nearest model, or `NEITHER` (the default model's
    fallback) when the best similarity is below ``threshold``."""
    return [
        model if score >= threshold else NEITHER for model, score in zip(top, scores, strict=True)
    ]


def accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    """Share of predictions equal to the label."""
    if not truth:
        return 0.0
    return sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth)


def per_label(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each label (0 where undefined, as scikit-learn's
    ``zero_division=0``)."""
    pairs = list(zip(truth, predicted, strict=True))
    result: dict[str, dict[str, float]] = {}
    for label in labels:
        hits = sum(t == p == label for t, p in pairs)
        chosen = sum(p == label for _, p in pairs)
        actual = sum(t == label for t, _ in pairs)
        precision = hits / chosen if chosen else 0.0
        recall = hits / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return result


def macro_f1(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> float:
    """The unweighted mean of the labels' F1."""
    scores = per_label(truth, predicted, labels)
    return sum(s["f1"] for s in scores.values()) / len(labels) if labels else 0.0


def choose_threshold(
    truth: Sequence[str], top: Sequence[str], scores: Sequence[float], labels: Sequence[str]
) -> float:
    """The threshold with the best macro-F1 (then accuracy) on a calibration set.

    Candidates are -1 (no fallback) and the midpoints between consecutive distinct scores, so
    each candidate puts a different set of prompts below the line; ties keep the lowest.
    """
    distinct = sorted(set(scores))
    candidates = [-1.0] + [(a + b) / 2 for a, b in itertools.pairwise(distinct)]
    if distinct:
        candidates.append(distinct[-1] + 1e-6)
    best, best_key = -1.0, (-1.0, -1.0)
    for threshold in candidates:
        predicted = predict(top, scores, threshold)
        key = (macro_f1(truth, predicted, labels), accuracy(truth, predicted))
        if key > best_key:
            best, best_key = threshold, key
    return best


def _nearest(index: RouteIndex, vectors: np.ndarray) -> tuple[list[str], list[float]]:
    scores = index.scores(vectors)
    best = scores.argmax(axis=1)
    return [index.models[i] for i in best], [float(scores[r, i]) for r, i in enumerate(best)]


def _report(
    truth: list[str], top: list[str], scores: list[float], threshold: float, labels: list[str]
) -> dict[str, Any]:
    predicted = predict(top, scores, threshold)
    return {
        "threshold": threshold,
        "accuracy": accuracy(truth, predicted),
        "macro_f1": macro_f1(truth, predicted, labels),
        "labels": per_label(truth, predicted, labels),
    }


def evaluate(
    encoder: TextEncoder, config: GraphConfig, prompts: list[Labelled], seed: int
) -> dict[str, Any]:
    """Scores both route sets; see the module's docstring."""
    examples, calibration, evaluation = split(prompts, seed)
    labels = [*sorted({p.label for p in prompts} - {NEITHER}), NEITHER]
    routes = {llm.name: list(llm.route_examples) for llm in config.llms if llm.route_examples}
    extra = {name: [p.prompt for p in examples if p.label == name] for name in routes}
    embed = _embedder(encoder)
    cal_vectors = embed([p.prompt for p in calibration])
    eval_vectors = embed([p.prompt for p in evaluation])
    results: dict[str, Any] = {
        "sizes": {"examples": len(examples), "calibration": len(calibration)}
        | {"evaluation": len(evaluation)},
        "route_sets": {},
    }
    for name, texts in (
        ("graph", routes),
        ("graph+examples", {m: routes[m] + extra[m] for m in routes}),
    ):
        index = RouteIndex({model: embed(t) for model, t in texts.items()})
        cal_top, cal_scores = _nearest(index, cal_vectors)
        threshold = choose_threshold([p.label for p in calibration], cal_top, cal_scores, labels)
        top, scores = _nearest(index, eval_vectors)
        truth = [p.label for p in evaluation]
        results["route_sets"][name] = {
            "examples_per_model": {m: len(t) for m, t in texts.items()},
            "calibrated": _report(truth, top, scores, threshold, labels),
            "calibration_split": _report(
                [p.label for p in calibration], cal_top, cal_scores, threshold, labels
            ),
            "no_threshold": _report(truth, top, scores, -1.0, labels),
        }
    return results


def _embedder(encoder: TextEncoder) -> Any:
    def embed(texts: list[str]) -> np.ndarray:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), 32):
            vectors.extend(encoder.encode(texts[start : start + 32])[0])
        return np.asarray(vectors, dtype=np.float32)

    return embed


def decision_time(
    encoder: TextEncoder, config: GraphConfig, prompts: list[str]
) -> dict[str, float]:
    """Milliseconds one `auto` decision takes: one prompt's embedding (batch of one, as an
    unbatched request reaches the encoder) plus `RouteIndex.route`; and the scoring alone."""
    routes = {llm.name: list(llm.route_examples) for llm in config.llms if llm.route_examples}
    index = RouteIndex({m: _embedder(encoder)(t) for m, t in routes.items()})
    encoder.encode(prompts[:2])  # warm-up
    total, scoring = [], []
    for prompt in prompts:
        started = time.perf_counter()
        (vector,), _ = encoder.encode([prompt])
        scored = time.perf_counter()
        index.route(vector, config.default_llm, config.router.min_similarity)
        done = time.perf_counter()
        total.append((done - started) * 1000)
        scoring.append((done - scored) * 1000)
    return {
        "decisions": len(prompts),
        "p50_ms": statistics.median(total),
        "p99_ms": float(np.percentile(total, 99)),
        "scoring_p50_ms": statistics.median(scoring),
        "route_examples": sum(len(t) for t in routes.values()),
    }


def _decisions(encoder: TextEncoder, config: GraphConfig, prompts: list[str]) -> list[str]:
    """The model the graph's router picks for each prompt, decided in process."""
    routes = {llm.name: list(llm.route_examples) for llm in config.llms if llm.route_examples}
    index = RouteIndex({m: _embedder(encoder)(t) for m, t in routes.items()})
    vectors = _embedder(encoder)(prompts)
    return [index.route(v, config.default_llm, config.router.min_similarity).model for v in vectors]


def _ttft(client: httpx.Client, url: str, model: str, prompt: str) -> tuple[float, str]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 1,
        "stream": True,
    }
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:"):
                return (time.perf_counter() - started) * 1000, response.headers.get(
                    ROUTED_MODEL_HEADER, model
                )
    raise RuntimeError(f"{model}: the stream ended without data")


def added_ttft(url: str, prompts: list[str], models: list[str]) -> dict[str, Any]:
    """TTFT of each prompt through ``auto`` and naming ``models`` (the decision this script
    makes in process, the same as the router's), alternating which goes first; each prompt once
    per way, so no decision comes from the router's cache. Where ``auto`` chose another model
    than the one named, the pair is counted and still measured."""
    auto, named, mismatched = [], [], 0
    with httpx.Client(timeout=120) as client:
        _ttft(client, url, AUTO_MODEL, "warm-up")
        for i, (prompt, model) in enumerate(zip(prompts, models, strict=True)):
            if i % 2:
                named_ms, _ = _ttft(client, url, model, prompt)
                auto_ms, routed = _ttft(client, url, AUTO_MODEL, prompt)
            else:
                auto_ms, routed = _ttft(client, url, AUTO_MODEL, prompt)
                named_ms, _ = _ttft(client, url, model, prompt)
            mismatched += routed != model
            auto.append(auto_ms)
            named.append(named_ms)
    differences = [a - n for a, n in zip(auto, named, strict=True)]
    return {
        "requests_per_way": len(prompts),
        "auto_p50_ms": statistics.median(auto),
        "named_p50_ms": statistics.median(named),
        "added_p50_ms": statistics.median(differences),
        "added_mean_ms": statistics.fmean(differences),
        "routed_elsewhere": mismatched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="labelled prompts (JSON lines)")
    parser.add_argument("--graph", type=Path, default=GRAPH, help="graph config (YAML)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--graph-url", help="a running graph: also measure auto's added TTFT")
    parser.add_argument("--ttft-prompts", type=int, default=40, help="prompts for the TTFT")
    args = parser.parse_args()

    config = GraphConfig.model_validate(yaml.safe_load(args.graph.read_text()))
    if config.encoder is None:
        parser.error(f"{args.graph} has no encoder")
    encoder = TextEncoder(
        resolve_source(config.encoder.source), "cpu", config.encoder.max_input_tokens
    )
    prompts = load(args.data)
    results: dict[str, Any] = {
        "data": str(args.data),
        "graph": str(args.graph),
        "seed": args.seed,
        "encoder": config.encoder.source,
        "prompts": len(prompts),
    }
    results |= evaluate(encoder, config, prompts, args.seed)
    evaluation = split(prompts, args.seed)[2]
    results["decision_time"] = decision_time(encoder, config, [p.prompt for p in evaluation])
    if args.graph_url:
        chosen = evaluation[: args.ttft_prompts]
        results["added_ttft"] = added_ttft(
            args.graph_url.rstrip("/"),
            [p.prompt for p in chosen],
            _decisions(encoder, config, [p.prompt for p in chosen]),
        )
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""The routing evaluation's arithmetic (tests/bench/route_eval.py): accuracy, per-label
precision/recall/F1 and macro-F1 as scikit-learn's ``classification_report`` defines them
(``zero_division=0``), the threshold choice, and the split of the shipped prompt set."""

from __future__ import annotations

import pytest

from tests.bench.route_eval import (
    DATA,
    NEITHER,
    Labelled,
    accuracy,
    choose_threshold,
    load,
    macro_f1,
    per_label,
    predict,
    split,
)

LABELS = ["geo", "code", NEITHER]
TRUTH = ["geo", "geo", "geo", "code", "code", NEITHER, NEITHER, NEITHER]
GUESS = ["geo", "geo", "code", "code", NEITHER, NEITHER, "geo", NEITHER]


def test_accuracy_and_per_label_scores_by_hand() -> None:
    assert accuracy(TRUTH, GUESS) == pytest.approx(5 / 8)
    scores = per_label(TRUTH, GUESS, LABELS)
    # geo: 2 right of 3 chosen, 2 of 3 found; code: 1 of 2 chosen, 1 of 2 found;
    # neither: 2 of 3 chosen, 2 of 3 found.
    assert scores["geo"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert scores["code"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2}
    )
    assert macro_f1(TRUTH, GUESS, LABELS) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_a_label_never_chosen_scores_zero_not_an_error() -> None:
    truth, guess = ["a", "b", "b"], ["b", "b", "b"]
    scores = per_label(truth, guess, ["a", "b"])
    assert scores["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["b"]["precision"] == pytest.approx(2 / 3)
    assert scores["b"]["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert macro_f1(truth, guess, ["a", "b"]) == pytest.approx(0.4)


def test_below_the_threshold_is_the_default_models() -> None:
    assert predict(["geo", "code", "geo"], [0.9, 0.2, 0.5], 0.5) == ["geo", NEITHER, "geo"]


def test_threshold_separates_the_off_topic_prompts() -> None:
    top = ["geo", "code", "geo", "code", "geo"]
    scores = [0.8, 0.7, 0.3, 0.25, 0.6]
    truth = ["geo", "code", NEITHER, NEITHER, "geo"]
    threshold = choose_threshold(truth, top, scores, LABELS)
    assert threshold == pytest.approx((0.3 + 0.6) / 2)
    assert accuracy(truth, predict(top, scores, threshold)) == 1.0
    # Nothing off topic: no threshold (-1) is as good as any and is kept.
    assert choose_threshold(["geo", "code"], ["geo", "code"], [0.2, 0.9], LABELS) == -1.0


def test_the_shipped_set_splits_into_disjoint_stratified_thirds() -> None:
    prompts = load(DATA)
    assert len(prompts) >= 200
    assert {p.label for p in prompts} == {"smollm2-geography", "smollm2-coding", NEITHER}
    assert len({p.prompt for p in prompts}) == len(prompts)
    parts = split(prompts, seed=0)
    assert sorted(p.prompt for part in parts for p in part) == sorted(p.prompt for p in prompts)
    for label in ("smollm2-geography", NEITHER):
        sizes = [sum(p.label == label for p in part) for part in parts]
        assert max(sizes) - min(sizes) <= 2
    assert split(prompts, seed=0) == parts
    assert split(prompts, seed=1) != parts
    assert split([Labelled("x", "a")], seed=0) == ([], [], [Labelled("x", "a")])

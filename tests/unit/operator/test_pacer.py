"""The converge pacer: back off while nothing changes, come forward on news."""

from __future__ import annotations

import pytest

from llmops_operator.handlers import Pacer


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr("llmops_operator.handlers.time.monotonic", lambda: now[0])
    return now


def test_quiet_passes_back_off_to_the_ceiling(clock: list[float]) -> None:
    pacer = Pacer(base=10, ceiling=120, resync=300)
    assert pacer.due("a")
    delays = []
    for _ in range(6):
        pacer.passed("a", progressed=False)
        waited = 0.0
        while not pacer.due("a"):
            clock[0] += 1
            waited += 1
        delays.append(waited)
    # Each due a little early (half a base interval) so a timer tick is never wasted.
    assert delays == [5, 15, 35, 75, 115, 115]


def test_progress_or_a_poke_makes_the_next_pass_due_soon(clock: list[float]) -> None:
    pacer = Pacer(base=10, ceiling=120, resync=300)
    for _ in range(5):
        pacer.passed("a", progressed=False)
    assert not pacer.due("a")
    pacer.poke("a")
    assert pacer.due("a")
    pacer.passed("a", progressed=True)
    clock[0] += 5
    assert pacer.due("a")
    assert pacer.due("other")


def test_resyncs_are_spread_over_the_second_half_of_the_first_period(
    clock: list[float],
) -> None:
    pacer = Pacer(base=10, ceiling=120, resync=300)
    uids = [f"uid-{i}" for i in range(200)]
    assert not any(pacer.resync_due(uid) for uid in uids)  # first sight: none at once
    first: dict[str, float] = {}
    for _ in range(300):
        clock[0] += 1
        for uid in uids:
            if uid not in first and pacer.resync_due(uid):
                first[uid] = clock[0] - 1000
    assert len(first) == len(uids)
    assert min(first.values()) >= 150
    assert max(first.values()) <= 300
    assert max(first.values()) - min(first.values()) > 100  # spread, not a herd
    uid = uids[0]
    clock[0] = 1000 + first[uid] + 299
    assert not pacer.resync_due(uid)
    clock[0] += 1
    assert pacer.resync_due(uid)

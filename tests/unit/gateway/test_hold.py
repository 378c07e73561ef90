"""Holding requests for a model with no serving replica (llmops_gateway.hold), and the
``readyReplicas`` discovery reads from an LLMDeployment's ``status.models``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from llmops_contract import HELD_REQUESTS_METRIC, SCALED_TO_ZERO_CODE
from llmops_gateway.discovery import backends_from
from llmops_gateway.hold import (
    DISCOVERY_POLL_S,
    PROBE_FIRST_S,
    Hold,
    HoldExpiredError,
    Holds,
    scaled_to_zero,
)
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.settings import GatewaySettings


def _deployment(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"name": "d", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"models": [{"name": e["name"]} for e in entries]},
        "status": {"endpoints": {"http": "http://graph:8000"}, "models": entries},
    }


def test_ready_replicas_zero_is_routed_and_held_unless_failed() -> None:
    """The operator's ``status.models[].readyReplicas`` (the CRD's per-model status): 0 on a
    model that is not Failed means "at zero" (routed, requests held); absent means the
    operator does not report it (the state alone decides, as before)."""
    table = backends_from(
        [
            _deployment(
                [
                    {"name": "zero", "state": "Ready", "readyReplicas": 0},
                    {"name": "starting", "state": "Pending", "readyReplicas": 0},
                    {"name": "up", "state": "Ready", "readyReplicas": 2},
                    {"name": "failed", "state": "Failed", "readyReplicas": 0},
                    {"name": "unreported", "state": "Loading"},
                ]
            )
        ]
    )
    at_zero = {name: (b.at_zero, b.ready, b.ready_replicas) for name, b in table.items()}
    assert at_zero == {
        "zero": (True, True, 0),
        "starting": (True, True, 0),
        "up": (False, True, 2),
        "failed": (False, False, 0),
        "unreported": (False, False, None),
    }


def test_only_the_routers_scaled_to_zero_code_holds() -> None:
    assert scaled_to_zero({"error": {"code": SCALED_TO_ZERO_CODE}})
    assert not scaled_to_zero({"error": {"code": "engine_unavailable"}})
    assert not scaled_to_zero({"detail": SCALED_TO_ZERO_CODE})


def _holds(zero: set[str] | None = None, **settings: Any) -> Holds:
    metrics = GatewayMetrics.create()
    at_zero = zero if zero is not None else set()
    return Holds(GatewaySettings(**settings), metrics, lambda model: model in at_zero)


def _sample(holds: Holds, name: str, **labels: str) -> float:
    value = holds.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_held_requests_probe_one_at_a_time_on_a_back_off() -> None:
    """However many requests are held, one retries at a time: the first 0.5 s after the
    model was found cold, then 1 s, then 2 s later; the others wait."""
    holds = _holds()
    probes: list[float] = []
    started = time.monotonic()

    async def held() -> None:
        hold = holds.hold("m")
        hold.cold()  # its own first try was answered "scaled to zero"
        try:
            while True:
                await hold.turn()
                probes.append(time.monotonic() - started)
                hold.cold()
        finally:
            hold.close()

    tasks = [asyncio.create_task(held()) for _ in range(30)]
    await asyncio.sleep(2.0)
    assert _sample(holds, HELD_REQUESTS_METRIC, model="m") == 30
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(probes) == 2, probes
    assert probes[0] == pytest.approx(PROBE_FIRST_S, abs=0.2)
    assert probes[1] == pytest.approx(PROBE_FIRST_S + 2 * PROBE_FIRST_S, abs=0.2)
    assert _sample(holds, HELD_REQUESTS_METRIC, model="m") == 0
    assert _sample(holds, "llmops_gateway_hold_seconds_count", model="m", outcome="cancelled") == 30
    assert holds.held("m") == 0


async def test_a_served_probe_wakes_every_held_request_at_once() -> None:
    holds = _holds()
    held = [holds.hold("m") for _ in range(10)]
    for hold in held:
        hold.cold()
    waiting = [asyncio.create_task(hold.turn()) for hold in held]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    prober = held[waiting.index(done.pop())]
    assert sum(task.done() for task in waiting) == 1
    prober.served()
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*waiting), 1.0)
    assert time.monotonic() - started < 0.1
    for hold in held:
        hold.served()
        hold.close()
    assert _sample(holds, "llmops_gateway_hold_seconds_count", model="m", outcome="served") == 10


async def test_a_new_request_joins_a_cold_model_without_calling_upstream() -> None:
    holds = _holds()
    assert holds.join("m") is None  # nothing known: it goes upstream
    first = holds.hold("m")
    first.cold()
    joined = holds.join("m")
    assert isinstance(joined, Hold)
    assert holds.held("m") == 2
    first.close()
    joined.close()
    assert holds.join("m") is None


async def test_discovery_at_zero_holds_until_a_replica_is_reported_without_probing() -> None:
    zero = {"m"}
    holds = _holds(zero)
    hold = holds.join("m")
    assert hold is not None
    turn = asyncio.create_task(hold.turn())
    await asyncio.sleep(PROBE_FIRST_S * 3)
    assert not turn.done(), "no probe while discovery reports zero ready replicas"
    zero.clear()
    started = time.monotonic()
    await asyncio.wait_for(turn, DISCOVERY_POLL_S + 0.5)
    assert time.monotonic() - started <= DISCOVERY_POLL_S + 0.2
    hold.served()
    hold.close()


async def test_past_the_deadline_the_hold_expires() -> None:
    holds = _holds(hold_timeouts={"m": 0.3}, hold_timeout_s=60)
    assert holds.timeout_s("other") == 60
    hold = holds.hold("m")
    hold.cold()
    started = time.monotonic()

    async def probe_until_expired() -> None:
        while True:
            await hold.turn()
            hold.cold()

    with pytest.raises(HoldExpiredError):
        await probe_until_expired()
    assert 0.3 <= time.monotonic() - started < 0.6
    hold.close()
    assert _sample(holds, "llmops_gateway_hold_seconds_count", model="m", outcome="expired") == 1
    assert _sample(holds, HELD_REQUESTS_METRIC, model="m") == 0


def test_a_zero_deadline_turns_holding_off() -> None:
    holds = _holds({"m"}, hold_timeout_s=0)
    assert not holds.enabled("m")
    assert holds.join("m") is None


async def test_a_probe_cut_short_passes_its_turn_on() -> None:
    """The probing request's client leaves: another held request probes at once, not after
    the next back-off."""
    holds = _holds()
    first, second = holds.hold("m"), holds.hold("m")
    first.cold()
    await asyncio.wait_for(first.turn(), 1.0)  # first is the prober now
    waiting = asyncio.create_task(second.turn())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    first.close()
    await asyncio.wait_for(waiting, 0.2)
    second.close()


def test_a_models_held_series_reads_zero_from_its_first_request() -> None:
    """KEDA's held-requests trigger and the dashboard read 0 for a model that was asked for and
    never held, not an empty result (a gauge child exists only once it is labelled)."""
    metrics = GatewayMetrics.create()
    holds = Holds(GatewaySettings(), metrics, lambda _: False)

    def series() -> dict[str, float]:
        return {
            sample.labels["model"]: sample.value
            for family in metrics.registry.collect()
            for sample in family.samples
            if sample.name == HELD_REQUESTS_METRIC
        }

    assert series() == {}
    assert holds.join("chat") is None
    assert series() == {"chat": 0.0}

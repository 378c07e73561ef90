"""The serving sweep's goal arithmetic and tables (tests/bench/serving_sweep.py).

The points have the shape `vllm bench serve --save-result` writes (vllm/benchmarks/serve.py:
``request_throughput``, ``request_goodput``, ``median_ttft_ms``, ...), reduced to the keys the
goals read; no server is started.
"""

from __future__ import annotations

from typing import Any

from tests.bench.serving_sweep import goals, rate_table


def _point(
    target: str, rate: float, throughput: float, goodput: float, ttft: float
) -> dict[str, Any]:
    return {
        "target": target,
        "rate": rate,
        "at": f"{rate}-{target}",
        "request_throughput": throughput,
        "request_goodput": goodput,
        "median_ttft_ms": ttft,
        "p99_ttft_ms": ttft * 2,
        "median_tpot_ms": 50.0,
        "median_e2el_ms": 2000.0,
        "cores_used_by_other_work": 0.1,
    }


def _sweep(gateway_goodput_at_1: float, gateway_ttft_at_1: float) -> list[dict[str, Any]]:
    # Direct saturates at 2 requests/s: the rate 4 is past it, the rate 1 is half of it.
    points = []
    for rate, done in ((0.5, 0.5), (1.0, 1.0), (4.0, 2.0)):
        points.append(_point("direct", rate, done, done, 200.0))
        points.append(_point("graph", rate, done, done * 0.96, 215.0))
        gateway = gateway_goodput_at_1 if rate == 1.0 else done * 0.96
        ttft = gateway_ttft_at_1 if rate == 1.0 else 220.0
        points.append(_point("gateway", rate, done, gateway, ttft))
    # A failed point (kept with its error) is no baseline and no measurement.
    points.append({"target": "graph", "rate": 4.0, "error": "Server disconnected", "at": "x"})
    return points


def test_goals_met_within_the_limits() -> None:
    result = goals(_sweep(gateway_goodput_at_1=0.96, gateway_ttft_at_1=224.0), [0.5, 1.0, 4.0])
    assert result["direct_saturation_req_s"] == 2.0
    assert result["half_saturation_rate"] == 1.0
    assert [row["below_saturation"] for row in result["per_rate"]] == [True, True, False]
    assert result["per_rate"][1]["graph_goodput_ratio"] == 0.96
    assert result["per_rate"][1]["added_ttft_p50_ms"] == 24.0
    assert result["graph_goodput_ge_0.95_direct"] is True
    assert result["gateway_goodput_ge_0.98_graph"] is True
    assert result["added_ttft_p50_le_25ms_at_half"] is True


def test_goals_missed_below_saturation() -> None:
    result = goals(_sweep(gateway_goodput_at_1=0.9, gateway_ttft_at_1=260.0), [0.5, 1.0, 4.0])
    assert result["per_rate"][1]["gateway_goodput_ratio"] == round(0.9 / 0.96, 3)
    assert result["gateway_goodput_ge_0.98_graph"] is False
    assert result["per_rate"][1]["added_ttft_p50_ms"] == 60.0
    assert result["added_ttft_p50_le_25ms_at_half"] is False


def test_rate_table_has_a_row_per_rate_with_ratios() -> None:
    text = rate_table({"points": _sweep(gateway_goodput_at_1=0.48, gateway_ttft_at_1=300.0)})
    rows = text.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["0.5", "1", "4"]
    # rate 1: graph / direct = 0.96, gateway / graph = 0.48 / 0.96 = 0.50
    assert [cell.strip() for cell in rows[1].split("|")[3:5]] == ["0.96", "0.50"]
    assert "200 (400), 215 (430), 300 (600)" in rows[1]

"""The usage and cost dashboard's queries, evaluated by Prometheus' own engine (`promtool test
rules`) on synthetic gateway counters, against values worked out here from the same rates.

The series are the gateway's (llmops_gateway/metrics.py): tokens by tenant, model and
direction, requests, and GPU-seconds of GPU models. One tenant's model is a GPU model, the
other's is not (its cost must still show: no GPU-seconds series is 0 GPU cost, not a gap);
a third namespace's series must not count. Every panel query must return the expected value
for each tenant and model; the e2e monitoring test checks the same queries return data from
the running platform.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DASHBOARD = Path(__file__).parents[2] / "deploy" / "dashboards" / "llmops-usage.json"
MINUTES = 30
PRICES = {"$input_price": 2.0, "$output_price": 4.0, "$gpu_hour_price": 3.6}
# Per second: (tenant, model) -> prompt tokens, completion tokens, GPU-seconds, requests.
RATES = {
    ("acme", "llama-70b"): (10.0, 5.0, 2.0, 1.0),
    ("beta", "embedder"): (1.0, 0.0, None, 0.5),
}


def _labels(**values: str) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in values.items()) + "}"


def _series(metric: str, per_second: float, **labels: str) -> dict[str, str]:
    step = per_second * 60
    return {"series": metric + _labels(**labels), "values": f"0+{step:g}x{MINUTES}"}


def _input_series() -> list[dict[str, str]]:
    out = []
    for namespace, scale in (("ml", 1), ("other", 100)):
        for (tenant, model), (prompt, completion, gpu, requests) in RATES.items():
            where = {"namespace": namespace, "tenant": tenant, "model": model}
            out.append(
                _series("llmops_gateway_tokens_total", prompt * scale, **where, direction="prompt")
            )
            out.append(
                _series(
                    "llmops_gateway_tokens_total",
                    completion * scale,
                    **where,
                    direction="completion",
                )
            )
            out.append(
                _series(
                    "llmops_gateway_requests_total",
                    requests * scale,
                    **where,
                    endpoint="chat",
                    status="200",
                )
            )
            if gpu is not None:
                out.append(_series("llmops_gateway_gpu_seconds_total", gpu * scale, **where))
    return out


def _cost_per_second(prompt: float, completion: float, gpu: float | None) -> float:
    tokens = (prompt * PRICES["$input_price"] + completion * PRICES["$output_price"]) / 1e6
    return tokens + (gpu or 0) * PRICES["$gpu_hour_price"] / 3600


def _expected() -> dict[str, list[tuple[dict[str, str], float]]]:
    """Panel title -> (labels, value) of each series it must return."""
    day = MINUTES * 60  # what increase(...[24h]) sees: the whole synthetic history
    per_model: dict[str, list[tuple[dict[str, str], float]]] = {
        "Tokens/s by tenant and model": [],
        "Requests/s by tenant and model": [],
        "GPUs in use by tenant and model (GPU-seconds/s)": [],
        "Estimated cost per hour by tenant and model": [],
        "Tokens in 24 h by tenant and model": [],
        "Estimated cost in 24 h by tenant and model": [],
    }
    for (tenant, model), (prompt, completion, gpu, requests) in RATES.items():
        who = {"tenant": tenant, "model": model}
        per_model["Tokens/s by tenant and model"] += [
            ({**who, "direction": "prompt"}, prompt),
            ({**who, "direction": "completion"}, completion),
        ]
        per_model["Requests/s by tenant and model"].append((who, requests))
        if gpu is not None:
            per_model["GPUs in use by tenant and model (GPU-seconds/s)"].append((who, gpu))
        cost = _cost_per_second(prompt, completion, gpu)
        per_model["Estimated cost per hour by tenant and model"].append((who, cost * 3600))
        per_model["Tokens in 24 h by tenant and model"].append((who, (prompt + completion) * day))
        per_model["Estimated cost in 24 h by tenant and model"].append((who, cost * day))
    totals = {
        "Tokens in 24 h": sum((p + c) * day for p, c, _, _ in RATES.values()),
        "GPU-hours in 24 h": sum((g or 0) * day for _, _, g, _ in RATES.values()) / 3600,
        "Requests in 24 h": sum(r * day for _, _, _, r in RATES.values()),
        "Estimated cost in 24 h": sum(
            _cost_per_second(p, c, g) * day for p, c, g, _ in RATES.values()
        ),
    }
    return {**per_model, **{title: [({}, value)] for title, value in totals.items()}}


def _promql(expr: str) -> str:
    """A panel's query as Grafana sends it for namespace ml, every tenant and model."""
    variables = {"$__rate_interval": "5m", "$namespace": "ml", "$tenant": ".*", "$model": ".*"}
    for name, value in {**variables, **{k: str(v) for k, v in PRICES.items()}}.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def test_usage_dashboard_panels_compute_usage_and_cost(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/setup installs it)")
    board = json.loads(DASHBOARD.read_text())
    panels = {panel["title"]: panel for panel in board["panels"]}
    expected = _expected()
    assert set(panels) == set(expected)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"tenant", "model", "input_price", "output_price", "gpu_hour_price"} <= set(variables)
    tests = []
    for title, samples in expected.items():
        (target,) = panels[title]["targets"]
        tests.append(
            {
                "expr": _promql(target["expr"]),
                "eval_time": f"{MINUTES}m",
                "exp_samples": [
                    {"labels": _labels(**labels) if labels else "{}", "value": value}
                    for labels, value in samples
                ],
            }
        )
    document = {
        "rule_files": ["empty.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": _input_series(), "promql_expr_test": tests}],
    }
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    (tmp_path / "usage_test.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", "usage_test.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

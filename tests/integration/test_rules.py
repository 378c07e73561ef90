"""Alert and recording rules, and the GPU dashboard's queries, on Prometheus' own rule engine.

`promtool test rules` evaluates them over synthetic series (tests/data/promtool), DCGM GPU
series included, and compares what fires and what the queries return with what is expected.
The KEDA trigger queries have their own tests (test_trigger_queries.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmops_cli.monitoring import MonitoringError, prometheus_config, run_prometheus
from tests.conftest import free_port
from tests.integration.test_trigger_queries import HEAD, LLAMA_WORKER, OTHER_WORKER, dcgm

ROOT = Path(__file__).parents[2]
RULES = ROOT / "deploy" / "rules" / "platform.yaml"
UNIT_TESTS = ROOT / "tests" / "data" / "promtool" / "platform_test.yaml"
SCALING_RULES = ROOT / "deploy" / "rules" / "scaling.yaml"
SCALING_TESTS = ROOT / "tests" / "data" / "promtool" / "scaling_test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/setup installs it)")
    return found


def run(promtool: str, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def alerts() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_rule_file_is_valid(promtool: str) -> None:
    assert "SUCCESS" in run(promtool, "check", "rules", str(RULES))


def test_every_alert_fires_on_bad_series_and_stays_quiet_on_good_ones(promtool: str) -> None:
    tests = {t["name"]: t for t in yaml.safe_load(UNIT_TESTS.read_text())["tests"]}
    firing = {c["alertname"] for c in tests["unhealthy"]["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for c in tests["healthy"]["alert_rule_test"] if not c["exp_alerts"]}
    assert set(alerts()) - firing == set(), "alerts never shown to fire"
    assert set(alerts()) - quiet == set(), "alerts never shown to stay quiet"
    run(promtool, "test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)


def test_scaling_alerts_fire_on_held_requests_and_stay_quiet_while_models_serve(
    promtool: str,
) -> None:
    """Per-model scaling alerts (deploy/rules/scaling.yaml) on the gateway's hold series and
    the operator's per-model replica gauge, joined by model name."""
    assert "SUCCESS" in run(promtool, "check", "rules", str(SCALING_RULES))
    tests = {t["name"]: t for t in yaml.safe_load(SCALING_TESTS.read_text())["tests"]}
    names = [
        rule["alert"]
        for group in yaml.safe_load(SCALING_RULES.read_text())["groups"]
        for rule in group["rules"]
    ]
    firing = {c["alertname"] for c in tests["unhealthy"]["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for c in tests["healthy"]["alert_rule_test"] if not c["exp_alerts"]}
    assert set(names) == firing == quiet
    run(promtool, "test", "rules", SCALING_TESTS.name, cwd=SCALING_TESTS.parent)
    # The chart ships a byte copy.
    shipped = ROOT / "charts" / "llmops" / "files" / "rules" / "scaling.yaml"
    assert shipped.read_bytes() == SCALING_RULES.read_bytes()


def test_scaling_tests_catch_a_model_at_zero_that_is_ignored(promtool: str, tmp_path: Path) -> None:
    broken = SCALING_RULES.read_text().replace("== 0)", "== 1)")
    assert broken != SCALING_RULES.read_text()
    (tmp_path / "deploy" / "rules").mkdir(parents=True)
    (tmp_path / "deploy" / "rules" / "scaling.yaml").write_text(broken)
    (tmp_path / "tests" / "data" / "promtool").mkdir(parents=True)
    shutil.copy(SCALING_TESTS, tmp_path / "tests" / "data" / "promtool")
    result = subprocess.run(
        [promtool, "test", "rules", SCALING_TESTS.name],
        capture_output=True,
        text=True,
        cwd=tmp_path / "tests" / "data" / "promtool",
        check=False,
    )
    assert result.returncode != 0
    assert "LLMOpsModelAtZeroWithHeldRequests" in result.stdout + result.stderr


def test_promtool_tests_catch_a_broken_threshold(promtool: str, tmp_path: Path) -> None:
    broken = RULES.read_text().replace("> 0.95", "> 0.99")  # KV-cache alert no longer fires
    assert broken != RULES.read_text()
    (tmp_path / "deploy" / "rules").mkdir(parents=True)
    (tmp_path / "deploy" / "rules" / "platform.yaml").write_text(broken)
    (tmp_path / "tests" / "data" / "promtool").mkdir(parents=True)
    shutil.copy(UNIT_TESTS, tmp_path / "tests" / "data" / "promtool")
    result = subprocess.run(
        [promtool, "test", "rules", UNIT_TESTS.name],
        capture_output=True,
        text=True,
        cwd=tmp_path / "tests" / "data" / "promtool",
        check=False,
    )
    assert result.returncode != 0
    assert "LLMOpsKVCacheNearlyFull" in result.stdout + result.stderr


# --- GPU dashboard panels on synthetic DCGM series (no GPU here to scrape) -----------------
# The series are labelled as the GPU Operator's scrape of dcgm-exporter stores them (see
# test_trigger_queries.py for the upstream files): the GPU's pod is in exported_pod.

DCGM_VALUES = {
    "DCGM_FI_DEV_GPU_UTIL": 80,
    "DCGM_FI_DEV_FB_USED": 72000,
    "DCGM_FI_DEV_FB_FREE": 8000,
    "DCGM_FI_DEV_POWER_USAGE": 300,
    "DCGM_FI_DEV_GPU_TEMP": 65,
    "DCGM_FI_DEV_XID_ERRORS": 0,
}
# What each GPU panel must show for that pod and GPU.
GPU_PANELS = {
    "GPU utilisation": 80,
    "GPU memory used": 0.9,
    "Power": 300,
    "Temperature": 65,
    "Last XID error": 0,
}


def grafana_to_promql(expr: str) -> str:
    """A panel's query as Grafana sends it, variables set to the synthetic pod's."""
    for variable, value in {
        "$__rate_interval": "5m",
        "$namespace": "ml",
        "$deployment": "llama",
        "$model": ".*",
    }.items():
        expr = expr.replace(variable, value)
    return expr


@pytest.mark.parametrize("honor", [False, True], ids=["gpu-operator-scrape", "honor-labels"])
def test_gpu_dashboard_panels_return_data_on_dcgm_series(
    promtool: str, tmp_path: Path, honor: bool
) -> None:
    board = json.loads((ROOT / "deploy" / "dashboards" / "llmops-gpus.json").read_text())
    panels = {panel["title"]: panel for panel in board["panels"]}
    assert set(panels) == set(GPU_PANELS)
    series_list = []
    for name, gpu_value in DCGM_VALUES.items():
        series_list.append(dcgm(name, LLAMA_WORKER, 0, gpu_value, honor=honor))
        # Another deployment's worker and this deployment's head must not show.
        series_list.append(dcgm(name, OTHER_WORKER, 0, 1, honor=honor))
        series_list.append(dcgm(name, HEAD, 0, 1, honor=honor))
    exprs = []
    for title, value in GPU_PANELS.items():
        (target,) = panels[title]["targets"]
        exprs.append(
            {
                "expr": grafana_to_promql(target["expr"]),
                "eval_time": "5m",
                "exp_samples": [
                    {"labels": f'{{exported_pod="{LLAMA_WORKER}",gpu="0"}}', "value": value}
                ],
            }
        )
    document = {
        "rule_files": ["empty.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series_list, "promql_expr_test": exprs}],
    }
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    (tmp_path / "gpu_test.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    run(promtool, "test", "rules", "gpu_test.yaml", cwd=tmp_path)


def test_local_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    # What `llmops up --monitoring` writes, checked by Prometheus's own validator (rules too).
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus_config({"ray": "127.0.0.1:9465", "gateway": "127.0.0.1:9464"}, tmp_path, RULES)
    )
    out = run(promtool, "check", "config", str(config))
    assert "SUCCESS" in out
    assert f"{RULES}" in out  # the platform rules were found and checked with it
    loaded = yaml.safe_load(config.read_text())
    jobs = {job["job_name"]: job for job in loaded["scrape_configs"]}
    assert jobs["ray"]["static_configs"][0]["labels"] == {
        "namespace": "local",
        "llmops_deployment": "local",
    }


def test_local_prometheus_starts_and_explains_a_busy_port(promtool: str) -> None:
    # promtool and prometheus come in the same Debian package.
    port = free_port()
    with run_prometheus({"self": f"127.0.0.1:{port}"}, port=port) as running:
        assert running.targets_dir.is_dir()
        with (
            pytest.raises(MonitoringError, match=r"(?i)address already in use"),
            run_prometheus({}, port=port, timeout_s=10),
        ):
            pass

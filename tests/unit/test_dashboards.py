"""Grafana dashboards: generated from deploy/dashboards/generate.py, valid, on variables only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.exported_metrics import exported, used_in

ROOT = Path(__file__).parents[2]
FOLDER = ROOT / "deploy" / "dashboards"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards_generate", FOLDER / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(FOLDER.glob("*.json"))}


def test_committed_json_is_what_the_code_generates() -> None:
    generated = generator().render()
    on_disk = {path.name: path.read_text() for path in sorted(FOLDER.glob("*.json"))}
    assert sorted(generated) == sorted(on_disk), (
        "run: .venv/bin/python deploy/dashboards/generate.py"
    )
    for name, text in generated.items():
        assert on_disk[name] == text, f"{name} is stale: run deploy/dashboards/generate.py"


def test_one_dashboard_per_audience() -> None:
    titles = {board["title"] for board in committed().values()}
    assert titles == {
        "llmops / Platform overview",
        "llmops / Model serving",
        "llmops / GPUs",
        "llmops / Gateway and tenants",
        "llmops / Usage and cost",
        "llmops / Operator",
    }


@pytest.mark.parametrize("name", sorted(committed()))
def test_dashboard_is_valid_and_uses_the_datasource_variable(name: str) -> None:
    board = committed()[name]
    assert board["uid"]
    assert len(board["uid"]) <= 40
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "deployment"} <= set(variables)
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        assert all(ref_ids)
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    # Panels fit the 24-column grid.
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def test_dashboards_query_only_metrics_the_platform_exports() -> None:
    exprs = " ".join(
        target["expr"]
        for board in committed().values()
        for panel in board["panels"]
        for target in panel["targets"]
    )
    used = used_in(exprs)
    assert used
    assert used <= exported(), f"not exported: {sorted(used - exported())}"

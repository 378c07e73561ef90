"""The `llmops` command as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmops_services import GraphConfig, default_graph_config
from tests.conftest import RunningGraph

LLMOPS = [sys.executable, "-m", "llmops_cli"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LLMOPS, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_explains_the_commands() -> None:
    result = _run("--help")
    assert result.returncode == 0
    assert "up" in result.stdout
    assert "config" in result.stdout
    up_help = _run("up", "--help")
    assert "--config" in up_help.stdout
    assert "--port" in up_help.stdout


def test_config_prints_the_default_graph_as_valid_yaml() -> None:
    result = _run("config")
    assert result.returncode == 0, result.stderr
    assert GraphConfig.model_validate(yaml.safe_load(result.stdout)) == default_graph_config()


def test_up_rejects_an_invalid_config_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "graph.yaml"
    bad.write_text(
        yaml.safe_dump({"llms": [{"name": "chat", "model": "embedded://smollm2-135m-instruct"}]})
    )
    result = _run("up", "--config", str(bad))
    assert result.returncode == 2
    assert "did you mean 'source'" in result.stderr
    assert "Ray" not in result.stdout


def test_up_rejects_a_bad_housekeeping_niceness_before_starting_anything() -> None:
    result = subprocess.run(
        [*LLMOPS, "up"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "LLMOPS_HOUSEKEEPING_NICE": "-5"},
    )
    assert result.returncode == 2
    assert "LLMOPS_HOUSEKEEPING_NICE must be a whole number from 0 to 19, got '-5'" in result.stderr
    assert "Ray" not in result.stdout


def test_up_rejects_a_missing_config_file(tmp_path: Path) -> None:
    result = _run("up", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


@pytest.mark.slow
def test_up_prints_working_examples(graph: RunningGraph) -> None:
    log = graph.log.read_text()
    assert f"ready at {graph.url}" in log
    python = log[log.index("from openai import OpenAI") :].split("\n\n")[0]
    result = subprocess.run(
        [sys.executable, "-c", python], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    curl = re.search(r"^curl .*?\}\]\}'$", log, flags=re.M | re.S)
    assert curl is not None
    if shutil.which("curl"):
        answer = subprocess.run(
            ["bash", "-c", curl.group(0)], capture_output=True, text=True, timeout=120, check=False
        )
        assert json.loads(answer.stdout)["choices"][0]["message"]["content"]

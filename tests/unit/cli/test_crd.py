"""`llmops crd`: every CRD of the project, printed as one YAML stream or written as files."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from llmops_cli.main import app
from llmops_contract import KIND, MODEL_KIND
from llmops_operator.crd import crd_files


def test_crd_prints_every_crd() -> None:
    result = CliRunner().invoke(app, ["crd"])
    assert result.exit_code == 0, result.output
    kinds = [doc["spec"]["names"]["kind"] for doc in yaml.safe_load_all(result.output)]
    assert kinds == [KIND, MODEL_KIND]


def test_crd_write_writes_every_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["crd", "--write", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name, text in crd_files().items():
        assert (tmp_path / name).read_text() == text
        assert f"wrote {tmp_path / name}" in result.output

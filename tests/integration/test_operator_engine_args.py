"""vLLM options in engine.extra_args: a misspelled one fails `llmops render` and the operator.

The CRD keeps extra_args free-form (x-kubernetes-preserve-unknown-fields), so the API server
accepts any key there; the contract's check against the pinned vLLM's arguments
(llmops_contract/vllm_engine_args.json, from vllm/engine/arg_utils.py) refuses it in the
renderer, before any child exists: `llmops render` exits 2 and the operator reports
Ready=False InvalidSpec naming the option. A valid option reaches the graph config the
RayService carries, whose LLM deployment hands it to vLLM.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from llmops_cli.main import app
from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import (
    create,
    eventually,
    example,
    live,
    llmd_path,
    patch,
    running_operator,
)

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(120)]

MISSPELLED = {"max_num_batch_tokens": 8192}
VALID = {"max_num_batched_tokens": 8192, "tool_call_parser": "hermes"}


def _tiny(extra_args: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(example("tiny-cpu"))
    manifest["spec"]["models"][0]["engine"]["extra_args"] = extra_args
    return manifest


def _render(tmp_path: Path, manifest: dict[str, Any]) -> Any:
    path = tmp_path / "llmd.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return CliRunner().invoke(app, ["render", "-f", str(path)])


def test_llmops_render_names_a_misspelled_vllm_option(tmp_path: Path) -> None:
    result = _render(tmp_path, _tiny(MISSPELLED))
    assert result.exit_code == 2
    assert "'max_num_batch_tokens'" in result.stderr
    assert "did you mean 'max_num_batched_tokens'?" in result.stderr
    assert "spec.models.0.engine.extra_args" in result.stderr


def test_llmops_render_carries_a_valid_vllm_option_into_the_graph(tmp_path: Path) -> None:
    result = _render(tmp_path, _tiny(VALID))
    assert result.exit_code == 0, result.stderr
    (service,) = [o for o in yaml.safe_load_all(result.stdout) if o["kind"] == "RayService"]
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (llm,) = application["args"]["llms"]
    assert llm["engine"]["extra_args"] == VALID


async def test_the_operator_reports_a_misspelled_vllm_option(kmock: KubeAPI) -> None:
    kmock.install_crds()
    async with running_operator(kmock):
        await create(kmock, _tiny(MISSPELLED))

        def ready() -> dict[str, Any]:
            status = live(kmock, "llmops.dev/v1alpha1/llmdeployments")["tiny"].get("status", {})
            conditions = {c["type"]: c for c in status.get("conditions", [])}
            return conditions.get("Ready", {})

        await eventually(lambda: ready().get("reason") == "InvalidSpec", what="InvalidSpec")
        assert ready()["status"] == "False"
        assert "'max_num_batch_tokens'" in ready()["message"]
        assert "did you mean 'max_num_batched_tokens'?" in ready()["message"]
        assert not live(kmock, "ray.io/v1/rayservices")
        # The right spelling converges: the RayService appears, the option in its graph.
        models = _tiny(VALID)["spec"]["models"]
        await patch(kmock, llmd_path("tiny"), {"spec": {"models": models}})
        await eventually(lambda: live(kmock, "ray.io/v1/rayservices"), what="the RayService")
        (service,) = live(kmock, "ray.io/v1/rayservices").values()
        (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert application["args"]["llms"][0]["engine"]["extra_args"] == VALID

"""`llmops scale` and the Serve config `llmops up` deploys, against the dashboard's Serve API.

KubeRay changes a running graph by PUTting the whole serveConfigV2 to
``/api/serve/applications/`` (ray-operator/controllers/ray/utils/dashboardclient); the
dashboard validates it with Ray's ``ServeDeploySchema`` (ray/dashboard/modules/serve/
serve_head.py), which the fake dashboard (tests/fakes/serve_dashboard.py) uses too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from llmops_cli.main import app
from llmops_cli.scale import ScaleError, deploy, scale, serve_config
from llmops_contract import APP_NAME, GraphConfig, llm_deployment_name
from llmops_operator.render import serve_replicas
from tests.fakes.serve_dashboard import fake_serve_api

ZERO_GRAPH = Path(__file__).parents[2] / "data" / "graph-zero.yaml"


def _graph() -> GraphConfig:
    return GraphConfig.model_validate(yaml.safe_load(ZERO_GRAPH.read_text()))


def _entries(config: dict[str, object]) -> dict[str, dict[str, object]]:
    (application,) = config["applications"]  # type: ignore[misc]
    return {d["name"]: d for d in application["deployments"]}


def test_serve_config_is_a_valid_serve_deploy_schema_with_replicas_as_overrides() -> None:
    graph = _graph()
    config = serve_config(graph, "127.0.0.1", 8001)
    ServeDeploySchema.model_validate(config)
    entries = _entries(config)
    cold, warm = (llm_deployment_name(m) for m in ("smollm2-cold", "smollm2-warm"))
    # As the operator renders a model at 0 and at 1 (render.py serve_replicas).
    assert entries[cold]["autoscaling_config"] == serve_replicas(0)
    assert entries[warm]["autoscaling_config"] == serve_replicas(1)
    assert entries[cold]["autoscaling_config"]["min_replicas"] == 0  # type: ignore[index]
    assert entries[warm]["graceful_shutdown_timeout_s"] == 240
    assert entries[cold]["graceful_shutdown_timeout_s"] == 60
    # The builder's args carry the graph unchanged, so the replicas that build it agree.
    (application,) = config["applications"]
    assert GraphConfig.model_validate(application["args"]) == graph


def test_scale_changes_only_that_models_deployment_entry() -> None:
    with fake_serve_api() as api:
        deploy(api.url, serve_config(_graph(), "127.0.0.1", 8001))
        scale(api.url, "smollm2-cold", 1)
        scale(api.url, "smollm2-warm", 2)
        first, to_one, to_two = api.puts
    cold, warm = (llm_deployment_name(m) for m in ("smollm2-cold", "smollm2-warm"))
    assert _entries(to_one)[cold]["autoscaling_config"] == serve_replicas(1)
    assert _entries(to_two)[warm]["autoscaling_config"] == serve_replicas(2)
    # Everything else is what was applied before: same args (no rebuild), same other entries.
    expected = copy.deepcopy(first)
    _entries(expected)[cold]["autoscaling_config"] = serve_replicas(1)
    assert to_one["applications"] == expected["applications"]
    _entries(expected)[warm]["autoscaling_config"] = serve_replicas(2)
    assert to_two["applications"] == expected["applications"]
    assert to_two["http_options"] == {"host": "127.0.0.1", "port": 8001}


def test_scale_to_zero_and_unknown_models() -> None:
    with fake_serve_api() as api:
        deploy(api.url, serve_config(_graph(), "127.0.0.1", 8001))
        scale(api.url, "smollm2-warm", 0)
        entry = _entries(api.puts[-1])[llm_deployment_name("smollm2-warm")]
        assert entry["autoscaling_config"] == serve_replicas(0)
        with pytest.raises(ScaleError, match=r"serves no model 'nope'.*smollm2-cold"):
            scale(api.url, "nope", 1)
        with pytest.raises(ScaleError, match="0 or more"):
            scale(api.url, "smollm2-warm", -1)
        assert len(api.puts) == 2


def test_scale_refuses_a_graph_serve_does_not_run() -> None:
    with fake_serve_api() as api, pytest.raises(ScaleError, match=f"no {APP_NAME!r}"):
        scale(api.url, "smollm2-cold", 1)


def test_llmops_scale_command() -> None:
    runner = CliRunner()
    with fake_serve_api() as api:
        deploy(api.url, serve_config(_graph(), "127.0.0.1", 8001))
        result = runner.invoke(app, ["scale", "smollm2-cold", "1", "--serve-api", api.url])
        assert result.exit_code == 0, result.output
        assert "smollm2-cold: scaling to 1" in result.output
        entry = _entries(api.puts[-1])[llm_deployment_name("smollm2-cold")]
        assert entry["autoscaling_config"] == serve_replicas(1)
        failed = runner.invoke(app, ["scale", "nope", "1", "--serve-api", api.url])
        assert failed.exit_code == 1
        assert "serves no model 'nope'" in failed.output

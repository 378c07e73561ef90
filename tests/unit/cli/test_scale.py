"""`llmops scale` and the Serve config `llmops up` deploys, against the dashboard's Serve API.

KubeRay changes a running graph by PUTting the whole serveConfigV2 to
``/api/serve/applications/`` (ray-operator/controllers/ray/utils/dashboardclient); the
dashboard validates it with Ray's ``ServeDeploySchema`` (ray/dashboard/modules/serve/
serve_head.py), which the fake dashboard (tests/fakes/serve_dashboard.py) uses too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve._private.config import DeploymentConfig
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve._private.version import DeploymentVersion
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from llmops_cli.adapters import change_adapters
from llmops_cli.main import app
from llmops_cli.scale import ScaleError, deploy, scale, serve_config
from llmops_contract import APP_NAME, ROUTER_DEPLOYMENT, GraphConfig, llm_deployment_name
from llmops_contract.graph import AdapterSpec
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


# --- LoRA adapters as user_config -----------------------------------------------------------


def _lora_graph(folder: Path) -> GraphConfig:
    """A model with one adapter, one with LoRA on and none yet, one without LoRA."""
    return GraphConfig.model_validate(
        {
            "llms": [
                {
                    "name": "chat",
                    "source": "embedded://smollm2-135m-instruct",
                    "engine": {"extra_args": {"max_loras": 1}},
                    "adapters": [{"name": "chat-geo", "source": str(folder)}],
                },
                {"name": "spare", "source": "embedded://smollm2-135m-instruct", "lora": True},
                {"name": "plain", "source": "embedded://smollm2-135m-instruct"},
            ],
            "encoder": None,
        }
    )


def _adapter_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    return path


def _version(config: dict[str, Any], deployment: str) -> DeploymentVersion:
    """The version Serve gives a deployment of this config: the application's code version
    (deploy_utils.py `get_app_code_version`) and its deployment options (version.py)."""
    (application,) = ServeDeploySchema.model_validate(config).applications
    entry = next(d for d in application.deployments if d.name == deployment)
    options = entry.model_dump(exclude_unset=True, exclude={"name"})
    return DeploymentVersion(
        get_app_code_version(application),
        DeploymentConfig(**{k: v for k, v in options.items() if k == "user_config"}),
        ray_actor_options={},
    )


def test_adapters_are_user_config_not_args(tmp_path: Path) -> None:
    """Serve hashes args into the code version (deploy_utils.py `get_app_code_version`);
    user_config is a NeedsActorReconfigure option (ray/serve/_private/config.py)."""
    graph = _lora_graph(_adapter_folder(tmp_path / "geo"))
    config = serve_config(graph, "127.0.0.1", 8001)
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    args = {llm["name"]: llm for llm in application["args"]["llms"]}
    assert all("adapters" not in llm for llm in args.values())
    assert args["chat"]["lora"] is True
    assert args["spare"]["lora"] is True
    assert "lora" not in args["plain"]
    entries = _entries(config)
    assert entries[llm_deployment_name("chat")]["user_config"] == {
        "adapters": [{"name": "chat-geo", "source": str(tmp_path / "geo")}]
    }
    assert entries[llm_deployment_name("spare")]["user_config"] == {"adapters": []}
    assert "user_config" not in entries[llm_deployment_name("plain")]
    assert entries[ROUTER_DEPLOYMENT]["user_config"] == {"adapters": {"chat-geo": "chat"}}
    # The args still make the graph, LoRA on where adapters come later.
    rebuilt = GraphConfig.model_validate(application["args"])
    assert [llm.lora_enabled for llm in rebuilt.llms] == [True, True, False]


def test_adding_an_adapter_changes_only_user_config_and_restarts_no_replica(
    tmp_path: Path,
) -> None:
    graph = _lora_graph(_adapter_folder(tmp_path / "geo"))
    law = _adapter_folder(tmp_path / "law")
    with fake_serve_api() as api:
        deploy(api.url, serve_config(graph, "127.0.0.1", 8001))
        change_adapters(api.url, "spare", add=AdapterSpec(name="spare-law", source=str(law)))
        change_adapters(api.url, "chat", remove="chat-geo")
        first, added, removed = api.puts
    spare, chat = llm_deployment_name("spare"), llm_deployment_name("chat")
    expected = copy.deepcopy(first)
    _entries(expected)[spare]["user_config"] = {
        "adapters": [{"name": "spare-law", "source": str(law)}]
    }
    _entries(expected)[ROUTER_DEPLOYMENT]["user_config"] = {
        "adapters": {"chat-geo": "chat", "spare-law": "spare"}
    }
    assert added["applications"] == expected["applications"]
    _entries(expected)[chat]["user_config"] = {"adapters": []}
    _entries(expected)[ROUTER_DEPLOYMENT]["user_config"] = {"adapters": {"spare-law": "spare"}}
    assert removed["applications"] == expected["applications"]
    for deployment in (spare, ROUTER_DEPLOYMENT):
        before, after = _version(first, deployment), _version(added, deployment)
        assert before.code_version == after.code_version
        assert not before.requires_actor_restart(after)
        assert before.requires_actor_reconfigure(after)
    # A model's untouched deployment keeps its version: Serve does not call it at all.
    assert _version(first, chat) == _version(added, chat)


def test_adapters_add_refuses_what_would_restart_or_clash(tmp_path: Path) -> None:
    graph = _lora_graph(_adapter_folder(tmp_path / "geo"))
    law = _adapter_folder(tmp_path / "law")
    with fake_serve_api() as api:
        deploy(api.url, serve_config(graph, "127.0.0.1", 8001))
        with pytest.raises(ScaleError, match="'plain' runs without LoRA"):
            change_adapters(api.url, "plain", add=AdapterSpec(name="x", source=str(law)))
        for taken in ("chat-geo", "plain"):
            with pytest.raises(ScaleError, match=f"serves {taken!r} already"):
                change_adapters(api.url, "spare", add=AdapterSpec(name=taken, source=str(law)))
        with pytest.raises(ScaleError, match="'chat-geo' is no adapter of model 'spare'"):
            change_adapters(api.url, "spare", remove="chat-geo")
        with pytest.raises(ScaleError, match="serves no model 'nope'"):
            change_adapters(api.url, "nope", remove="chat-geo")
        assert len(api.puts) == 1


def test_llmops_adapters_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = _lora_graph(_adapter_folder(tmp_path / "geo"))
    _adapter_folder(tmp_path / "law")
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    with fake_serve_api() as api:
        deploy(api.url, serve_config(graph, "127.0.0.1", 8001))
        serve_api = ["--serve-api", api.url]
        result = runner.invoke(app, ["adapters", "add", "spare", "spare-law", "law", *serve_api])
        assert result.exit_code == 0, result.output
        assert "spare: adapter spare-law added" in result.output
        entry = _entries(api.puts[-1])[llm_deployment_name("spare")]
        # A relative folder reaches the replicas, which run elsewhere, as an absolute path.
        assert entry["user_config"] == {
            "adapters": [{"name": "spare-law", "source": str(tmp_path / "law")}]
        }
        failed = runner.invoke(app, ["adapters", "add", "spare", "x", "model", *serve_api])
        assert failed.exit_code == 1
        assert "no adapter_config.json" in failed.output
        result = runner.invoke(app, ["adapters", "remove", "spare", "spare-law", *serve_api])
        assert result.exit_code == 0, result.output
        assert _entries(api.puts[-1])[llm_deployment_name("spare")]["user_config"] == {
            "adapters": []
        }
        assert len(api.puts) == 3

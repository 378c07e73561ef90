"""Per-model scaling in the renderer: an LLMModel and a ScaledObject per model, each model's
count reaching only its own Serve deployment and worker group.

Upstream rules reproduced: Ray Serve applies a config whose code version (import_path, args)
is unchanged as deployment overrides only (serve/_private/application_state.py
apply_app_config), so only the changed deployment's entry may differ; KubeRay's cluster hash
leaves worker group replicas/min/max out (ray-operator/controllers/ray/utils/util.go); KEDA's
scaleTargetRef names any kind with a /scale subresource (pkg/scaling/resolver, the scale client).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from llmops_contract import HELD_REQUESTS_METRIC
from llmops_operator import queries, render
from llmops_operator.render import Observed
from tests.schemas import assert_valid

ROOT = Path(__file__).parents[3]
UID = "5d3c1b2a-0000-4000-8000-000000000001"


def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        (ROOT / "deploy" / "examples" / "per-model-scaling.yaml").read_text()
    )
    loaded["metadata"]["uid"] = UID
    return loaded


def children(spec: dict[str, Any], observed: Observed | None = None) -> dict[str, dict[str, Any]]:
    target = render.parse_manifest(spec)
    objs = render.render_target(
        target, render.RenderDefaults(), render.graph_config(target), observed
    )
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def llm_entries(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(objs["RayService/team"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    deployments = config["applications"][0]["deployments"]
    return {d["name"]: d for d in deployments}


def groups(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    cluster = objs["RayService/team"]["spec"]["rayClusterConfig"]
    return {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def test_each_model_gets_an_owned_llmmodel_and_a_scaled_object_targeting_it() -> None:
    objs = children(manifest())
    assert_valid(objs.values())
    chat, code = objs["LLMModel/team-chat"], objs["LLMModel/team-code"]
    assert chat["spec"] == {"deployment": "team", "model": "chat", "replicas": 2}
    assert code["spec"] == {"deployment": "team", "model": "code", "replicas": 0}
    assert chat["metadata"]["labels"]["llmops.dev/model"] == "chat"
    assert chat["metadata"]["ownerReferences"][0]["kind"] == "LLMDeployment"
    assert chat["metadata"]["ownerReferences"][0]["controller"] is True
    assert "ScaledObject/team" not in objs  # the single ScaledObject is gone
    for model, low, high in (("chat", 1, 6), ("code", 0, 2)):
        scaled = objs[f"ScaledObject/team-{model}"]["spec"]
        assert scaled["scaleTargetRef"] == {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "LLMModel",
            "name": f"team-{model}",
        }
        assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (low, high)
        triggers = {t["name"]: t for t in scaled["triggers"]}
        assert triggers["queue-depth"]["metadata"]["query"] == (
            queries.queue_depth("llmops-demo", "team", model).query
        )
        assert f'model_name="{model}"' in triggers["kv-cache-usage"]["metadata"]["query"]
        held = triggers["held-requests"]
        assert held["metadata"]["query"] == f'sum({HELD_REQUESTS_METRIC}{{model="{model}"}})'
        assert held["metadata"]["activationThreshold"] == "0"
    # Per-model targets override the deployment's; unset ones fall back to it.
    code_triggers = {t["name"]: t for t in objs["ScaledObject/team-code"]["spec"]["triggers"]}
    chat_triggers = {t["name"]: t for t in objs["ScaledObject/team-chat"]["spec"]["triggers"]}
    assert code_triggers["queue-depth"]["metadata"]["threshold"] == "4"
    assert chat_triggers["queue-depth"]["metadata"]["threshold"] == "8"
    assert code_triggers["gpu-utilization"]["metadata"]["threshold"] == "80"


def test_one_models_count_changes_only_its_serve_entry_and_worker_group() -> None:
    before = children(manifest(), Observed(model_replicas={"chat": 2, "code": 0}))
    after = children(manifest(), Observed(model_replicas={"chat": 2, "code": 1}))
    old, new = llm_entries(before), llm_entries(after)
    assert old["llm-chat"] == new["llm-chat"]
    assert old["llm-code"]["autoscaling_config"]["min_replicas"] == 0
    assert new["llm-code"]["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 1,
        "initial_replicas": 1,
    }
    for name in ("router", "encoder"):
        assert old[name] == new[name]
    old_app = yaml.safe_load(before["RayService/team"]["spec"]["serveConfigV2"])
    new_app = yaml.safe_load(after["RayService/team"]["spec"]["serveConfigV2"])
    assert old_app["applications"][0]["args"] == new_app["applications"][0]["args"]
    old_groups, new_groups = groups(before), groups(after)
    assert old_groups["chat"] == new_groups["chat"]
    assert (old_groups["code"]["replicas"], old_groups["code"]["minReplicas"]) == (0, 0)
    assert (new_groups["code"]["replicas"], new_groups["code"]["maxReplicas"]) == (1, 2)
    old_cluster = before["RayService/team"]["spec"]["rayClusterConfig"]
    new_cluster = after["RayService/team"]["spec"]["rayClusterConfig"]
    assert render.cluster_hash(old_cluster) == render.cluster_hash(new_cluster)
    # The LLMModel carries the observed count, not the spec's.
    assert after["LLMModel/team-code"]["spec"]["replicas"] == 1


def test_a_model_at_zero_keeps_no_worker_and_a_serve_config_ray_accepts() -> None:
    objs = children(manifest(), Observed(model_replicas={"chat": 3, "code": 0}))
    code = groups(objs)["code"]
    assert (code["replicas"], code["minReplicas"]) == (0, 0)
    entry = llm_entries(objs)["llm-code"]["autoscaling_config"]
    assert (entry["min_replicas"], entry["initial_replicas"]) == (0, 0)
    assert groups(objs)["chat"]["replicas"] == 3


def test_models_without_their_own_values_fall_back_to_the_deployments() -> None:
    spec = manifest()
    for model in spec["spec"]["models"]:
        model.pop("replicas")
        model.pop("autoscaling")
    spec["spec"]["replicas"] = 3
    spec["spec"]["autoscaling"].update(scaleToZero=True, maxReplicas=5)
    objs = children(spec)
    for model in ("chat", "code"):
        assert objs[f"LLMModel/team-{model}"]["spec"]["replicas"] == 3
        scaled = objs[f"ScaledObject/team-{model}"]["spec"]
        assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (0, 5)


def test_a_per_model_bounds_change_reaches_only_its_worker_group() -> None:
    spec = manifest()
    changed = copy.deepcopy(spec)
    changed["spec"]["models"][0]["autoscaling"]["maxReplicas"] = 9
    old, new = groups(children(spec)), groups(children(changed))
    assert (old["chat"]["maxReplicas"], new["chat"]["maxReplicas"]) == (6, 9)
    assert old["code"] == new["code"]


def test_autoscaling_off_drops_every_scaled_object_and_keeps_the_models() -> None:
    spec = manifest()
    spec["spec"]["autoscaling"]["enabled"] = False
    objs = children(spec)
    assert not [k for k in objs if k.startswith("ScaledObject/")]
    assert {k for k in objs if k.startswith("LLMModel/")} == {
        "LLMModel/team-chat",
        "LLMModel/team-code",
    }

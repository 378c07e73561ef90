"""LoRA adapters of an LLMDeployment's models: rendered as the Serve user_config of each
model's deployment and of the router (the graph args say only ``lora: true``), fetched into the
model cache with the models, names checked.

Upstream behaviour reproduced: Ray Serve validates a serveConfigV2 with
`ray.serve.schema.ServeDeploySchema` (what KubeRay's PUT /api/serve/applications/ checks), and
hashes an application's ``args`` into its code version
(serve/_private/deploy_utils.py `get_app_code_version`): a new version rebuilds the application
and every deployment gets it (serve/_private/application_state.py `apply_app_config`,
`build_serve_application`), which restarts their replicas
(serve/_private/version.py `DeploymentVersion.requires_actor_restart`); a changed user_config
alone is handed to the running replicas' ``reconfigure`` instead.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeDeploySchema

from llmops_contract import GraphConfig
from llmops_operator import render
from llmops_operator.render import RenderError
from tests.schemas import assert_valid, schema_errors

ROOT = Path(__file__).parents[3]
UID = "7e1f2a3b-0000-4000-8000-00000000ada9"
HF_ADAPTER = "hf://my-org/chat-sql-lora@v2"
PVC_ADAPTER = "pvc://adapters/support"
IMAGE_ADAPTER = "/opt/adapters/legal"
S3_ADAPTER = "s3://adapters/small/poem"


def manifest(access_mode: str = "ReadWriteOnce") -> dict[str, Any]:
    """Two models, one on GPU with three adapters (hub, claim, image), one on CPU with one."""
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "team", "namespace": "llmops-demo", "uid": UID},
        "spec": {
            "models": [
                {
                    "name": "chat",
                    "source": "hf://org/chat-8b",
                    "engine": {"extra_args": {"max_loras": 2}},
                    "resources": {"gpus": 1},
                    "adapters": [
                        {"name": "chat-sql", "source": HF_ADAPTER},
                        {"name": "chat-support", "source": PVC_ADAPTER},
                        {"name": "chat-legal", "source": IMAGE_ADAPTER},
                    ],
                },
                {
                    "name": "small",
                    "source": "embedded://smollm2-135m-instruct",
                    "resources": {"gpus": 0, "cpu": "4", "memory": "8Gi"},
                    "adapters": [{"name": "small-tone", "source": "hf://my-org/small-tone"}],
                },
            ],
            "cache": {"accessMode": access_mode},
        },
    }


def children(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in render.render(spec)}


def serve_app(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    config = yaml.safe_load(objs["RayService/team"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    app: dict[str, Any] = config["applications"][0]
    return app


def fetched(container: dict[str, Any]) -> list[str]:
    command: list[str] = container["command"]
    assert command[:2] == ["llmops", "fetch"]
    return [arg for arg in command[2:] if not arg.startswith("/") and not arg.startswith("--")]


def test_adapters_reach_the_graph_config_with_mounted_folders_for_claims() -> None:
    objs = children(manifest())
    assert schema_errors(manifest()) == []
    assert_valid(objs.values())
    app = serve_app(objs)
    graph = GraphConfig.model_validate(app["args"])
    assert [llm.lora for llm in graph.llms] == [True, True]
    # The adapters travel as user_config of each model's deployment and of the router.
    entries = {d["name"]: d for d in app["deployments"]}
    adapters = {
        llm.name: {
            a["name"]: a["source"] for a in entries[llm.deployment_name]["user_config"]["adapters"]
        }
        for llm in graph.llms
    }
    assert entries["router"]["user_config"] == {
        "adapters": {name: llm for llm, table in adapters.items() for name in table}
    }
    assert adapters == {
        # hf:// stays a hub source: the replica resolves it through the model cache offline.
        "chat": {
            "chat-sql": HF_ADAPTER,
            "chat-support": f"{render.SOURCES_MOUNT}/adapters/support",
            "chat-legal": IMAGE_ADAPTER,
        },
        "small": {"small-tone": "hf://my-org/small-tone"},
    }
    # The adapter's claim is mounted read-only where its rendered source points.
    cluster = objs["RayService/team"]["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["adapters"]
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[f"{render.SOURCES_MOUNT}/adapters"]["readOnly"] is True


def test_no_adapters_leave_the_graph_args_as_before() -> None:
    spec = manifest()
    for model in spec["spec"]["models"]:
        del model["adapters"]
    del spec["spec"]["models"][0]["engine"]["extra_args"]
    for llm in serve_app(children(spec))["args"]["llms"]:
        assert "adapters" not in llm


def test_the_shared_loader_fetches_hub_adapters_and_leaves_folders_in_place() -> None:
    objs = children(manifest("ReadWriteMany"))
    assert_valid(objs.values())
    job = next(o for o in objs.values() if o["kind"] == "Job")
    wanted = fetched(job["spec"]["template"]["spec"]["containers"][0])
    assert wanted == sorted(
        [
            "embedded://all-minilm-l6-v2",
            "embedded://smollm2-135m-instruct",
            "hf://org/chat-8b",
            HF_ADAPTER,
            "hf://my-org/small-tone",
        ]
    )
    # The claim is mounted, the image's folder read in place.
    assert PVC_ADAPTER not in wanted
    assert IMAGE_ADAPTER not in wanted


def test_the_loader_fetches_s3_adapters_and_checks_every_adapter_as_one() -> None:
    """`llmops fetch --adapter SOURCE` checks a folder for adapter_config.json (a model's for
    config.json), so each adapter source is passed that way, and only adapter sources."""
    spec = manifest("ReadWriteMany")
    spec["spec"]["models"][1]["adapters"].append({"name": "small-s3", "source": S3_ADAPTER})
    spec["spec"]["cache"]["credentialsSecret"] = "s3-keys"
    assert not schema_errors(spec)
    job = next(o for o in children(spec).values() if o["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    flagged = [command[i + 1] for i, arg in enumerate(command) if arg == "--adapter"]
    assert sorted(flagged) == sorted([HF_ADAPTER, "hf://my-org/small-tone", S3_ADAPTER])
    assert "hf://org/chat-8b" in command
    assert command[command.index("hf://org/chat-8b") - 1] != "--adapter"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-keys"}}]


def test_a_new_adapter_names_a_new_loader_job() -> None:
    spec = manifest("ReadWriteMany")
    before = {o["metadata"]["name"] for o in render.render(spec) if o["kind"] == "Job"}
    spec["spec"]["models"][1]["adapters"].append(
        {"name": "small-poem", "source": "hf://my-org/small-poem"}
    )
    after = {o["metadata"]["name"] for o in render.render(spec) if o["kind"] == "Job"}
    assert before
    assert after
    assert before != after


def test_per_pod_caches_fetch_adapters_where_their_model_may_run() -> None:
    cluster = children(manifest())["RayService/team"]["spec"]["rayClusterConfig"]
    head = fetched(cluster["headGroupSpec"]["template"]["spec"]["initContainers"][0])
    worker = fetched(cluster["workerGroupSpecs"][0]["template"]["spec"]["initContainers"][0])
    # The head offers no GPU: the GPU model's adapter is skipped with it, the CPU model's kept.
    assert "hf://my-org/small-tone" in head
    assert HF_ADAPTER not in head
    assert "hf://org/chat-8b" not in head
    assert HF_ADAPTER in worker
    assert "hf://my-org/small-tone" in worker


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda s: s["models"][1]["adapters"].append({"name": "chat-sql", "source": HF_ADAPTER}),
            r"spec\.models\[1\]\.adapters\[1\]\.name 'chat-sql' is already "
            r"spec\.models\[0\]\.adapters\[0\]\.name",
        ),
        (
            lambda s: s["models"][0]["adapters"].append({"name": "small", "source": HF_ADAPTER}),
            r"spec\.models\[0\]\.adapters\[3\]\.name 'small' is already spec\.models\[1\]\.name",
        ),
        (
            lambda s: s["models"][0]["adapters"].append(
                {"name": "all-minilm-l6-v2", "source": HF_ADAPTER}
            ),
            r"is already spec\.encoder\.name",
        ),
    ],
)
def test_duplicate_adapter_names_are_refused_naming_the_field(change: Any, field: str) -> None:
    spec = copy.deepcopy(manifest())
    change(spec["spec"])
    with pytest.raises(RenderError, match=field):
        render.render(spec)


@pytest.mark.parametrize(
    "source", ["embedded://smollm2-135m-instruct", "gs://b/a", "pvc://Bad_Claim/x"]
)
def test_adapter_sources_the_loader_cannot_serve_are_refused_by_the_crd(source: str) -> None:
    spec = manifest()
    spec["spec"]["models"][0]["adapters"][0]["source"] = source
    assert any("spec.models.0.adapters.0.source" in e for e in schema_errors(spec))
    with pytest.raises(RenderError, match=r"spec\.models\.0\.adapters\.0\.source"):
        render.render(spec)


def test_the_crd_keys_adapters_by_name() -> None:
    crd = yaml.safe_load((ROOT / "charts/llmops/crds/llmops.dev_llmdeployments.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    adapters = spec["properties"]["models"]["items"]["properties"]["adapters"]
    assert adapters["x-kubernetes-list-type"] == "map"
    assert adapters["x-kubernetes-list-map-keys"] == ["name"]
    assert adapters["items"]["required"] == ["name", "source"]


def test_adding_an_adapter_changes_only_user_config_not_the_code_version() -> None:
    """Serve rebuilds an application, restarting every replica, when its code version
    (import_path, args, runtime_env) changes, and reconfigures running replicas in place when
    only a deployment's user_config does (serve/_private/config.py: NeedsActorReconfigure)."""
    spec = manifest()
    before = serve_app(children(spec))
    spec["spec"]["models"][1]["adapters"].append(
        {"name": "small-poem", "source": "hf://my-org/small-poem"}
    )
    after = serve_app(children(spec))
    assert after["args"] == before["args"]
    changed = [
        old["name"]
        for old, new in zip(before["deployments"], after["deployments"], strict=True)
        if old != new
    ]
    assert changed == ["llm-small", "router"]
    for old, new in zip(before["deployments"], after["deployments"], strict=True):
        assert {k: v for k, v in old.items() if k != "user_config"} == {
            k: v for k, v in new.items() if k != "user_config"
        }
    versions = {
        get_app_code_version(
            ServeDeploySchema.model_validate({"applications": [app]}).applications[0]
        )
        for app in (before, after)
    }
    assert len(versions) == 1
    # Turning LoRA on for a model (its first adapter) changes its engine: a new version.
    del spec["spec"]["models"][1]["adapters"]
    without = serve_app(children(spec))
    assert without["args"] != before["args"]


@pytest.mark.parametrize(
    ("source", "new_pods"),
    [
        ("hf://my-org/small-poem", True),  # fetched by the pods (or the loader they wait for)
        ("pvc://poems/small", True),  # a claim not mounted yet
        ("pvc://adapters/poem", False),  # the claim is mounted already
        ("/opt/adapters/poem", False),  # read in place from the image
    ],
)
def test_which_new_adapters_change_the_ray_pods(source: str, new_pods: bool) -> None:
    """The cluster hash KubeRay compares (see `render.cluster_hash`) moves only when the Ray
    pods change, as docs/install.md says of adapters added to a running deployment."""
    for mode in ("ReadWriteOnce", "ReadWriteMany"):
        spec = manifest(mode)
        before = children(spec)["RayService/team"]
        spec["spec"]["models"][1]["adapters"].append({"name": "small-poem", "source": source})
        after = children(spec)["RayService/team"]
        hashes = [
            rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["annotations"]
            for rs in (before, after)
        ]
        assert (hashes[0] != hashes[1]) is new_pods
        assert before["spec"]["serveConfigV2"] != after["spec"]["serveConfigV2"]


def test_a_model_with_lora_on_takes_its_first_adapter_without_a_new_version() -> None:
    """`lora: true` keeps LoRA on in a model's engine with no adapter declared, so its first
    adapter is a user_config change only (the same code version, as above)."""
    spec = manifest()
    del spec["spec"]["models"][1]["adapters"]
    spec["spec"]["models"][1]["lora"] = True
    assert not schema_errors(spec)
    before = serve_app(children(spec))
    assert GraphConfig.model_validate(before["args"]).llms[1].lora_enabled
    spec["spec"]["models"][1]["adapters"] = [{"name": "small-tone", "source": IMAGE_ADAPTER}]
    after = serve_app(children(spec))
    assert after["args"] == before["args"]
    # Without lora, the engine had started with LoRA off: a different graph config.
    del spec["spec"]["models"][1]["adapters"]
    spec["spec"]["models"][1]["lora"] = False
    assert serve_app(children(spec))["args"] != before["args"]

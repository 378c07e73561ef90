"""Renderer: golden files, schema validity, and what a spec turns into."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops_operator import queries
from llmops_operator.crd import CRD_FILE_NAME, MODEL_CRD_FILE_NAME, crd_files
from llmops_operator.render import RenderDefaults, RenderError, cluster_hash, render
from tests.schemas import assert_valid, schema_errors

ROOT = Path(__file__).parents[3]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"
UID = "0b7c6a9e-1f2d-4c3b-9a8e-7d6c5b4a3f21"


def load(path: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(path.read_text())
    return manifest


def with_uid(manifest: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    out["metadata"]["uid"] = UID
    return out


def test_there_are_the_four_documented_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {
        "tiny-cpu",
        "llama-8b-gpu",
        "llama-70b-tp",
        "semantic-routing",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_against_the_generated_crd(path: Path) -> None:
    assert schema_errors(load(path)) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_children_validate_against_official_schemas(path: Path) -> None:
    assert_valid(render(with_uid(load(path))))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_render_matches_golden_file(path: Path) -> None:
    rendered = yaml.safe_dump_all(render(with_uid(load(path))), sort_keys=False)
    golden = GOLDEN / f"{path.stem}.yaml"
    if os.environ.get("LLMOPS_UPDATE_GOLDEN") == "1":
        golden.write_text(rendered)
    assert golden.read_text() == rendered, (
        f"{golden.name} is stale: rerun with LLMOPS_UPDATE_GOLDEN=1 and review the diff"
    )


def test_committed_crds_are_the_generated_ones() -> None:
    for name, text in crd_files().items():
        committed = ROOT / "charts" / "llmops" / "crds" / name
        assert committed.read_text() == text, "run `llmops crd --write charts/llmops/crds`"
    assert set(crd_files()) == {CRD_FILE_NAME, MODEL_CRD_FILE_NAME}


def test_schema_check_catches_a_typo_in_a_rendered_object() -> None:
    objs = render(with_uid(load(EXAMPLES[0])))
    rayservice = next(o for o in objs if o["kind"] == "RayService")
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscalng"] = True
    errors = schema_errors(rayservice)
    assert errors
    assert "enableInTreeAutoscalng" in errors[0]
    job = next(o for o in objs if o["kind"] == "Job")
    job["spec"]["backoffLimit"] = "four"
    assert schema_errors(job)


def test_crd_schema_rejects_bad_values_with_the_field_named() -> None:
    manifest = load(ROOT / "deploy" / "examples" / "llama-8b-gpu.yaml")
    manifest["spec"]["models"][0]["resources"]["gpus"] = 99
    manifest["spec"]["router"]["policy"] = "round-robin"
    manifest["spec"]["replicaz"] = 2
    errors = "\n".join(schema_errors(manifest))
    assert "spec.models.0.resources.gpus" in errors
    assert "round-robin" in errors
    assert "replicaz" in errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["models"].append(copy.deepcopy(s["models"][0])), "model names must be unique"),
        (
            lambda s: s["models"][0]["engine"].update(tensor_parallel_size=2),
            "must equal engine.tensor_parallel_size",
        ),
        (lambda s: s["router"].update(policy="semantic"), "needs routeExamples"),
        (lambda s: s["autoscaling"].update(minReplicas=5, maxReplicas=2), "below minReplicas"),
        (lambda s: s["router"].update(defaultModel="nope"), "is not one of the llms"),
        (lambda s: s["models"][0].update(source="gs://bucket/model"), "spec.models.0.source"),
        (lambda s: s["models"][0].update(source="s3://Bucket_1/m"), "s3://bucket/folder"),
        (lambda s: s["models"][0].update(source="pvc://models/../etc"), "without '.' or '..'"),
    ],
)
def test_invalid_specs_fail_with_a_message_that_says_what_to_fix(change: Any, message: str) -> None:
    manifest = load(ROOT / "deploy" / "examples" / "llama-8b-gpu.yaml")
    change(manifest["spec"])
    with pytest.raises(RenderError, match=message):
        render(manifest)


def test_wrong_kind_is_rejected() -> None:
    with pytest.raises(RenderError, match=r"expected apiVersion llmops\.dev/v1alpha1"):
        render({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})


def test_replicas_live_only_in_serve_overrides() -> None:
    base = load(ROOT / "deploy" / "examples" / "llama-8b-gpu.yaml")
    scaled = copy.deepcopy(base)
    scaled["spec"]["replicas"] = 5
    one = {o["kind"]: o for o in render(base)}
    five = {o["kind"]: o for o in render(scaled)}
    # Only the worker group's counts differ, which KubeRay's cluster hash leaves out (no new
    # cluster): ray-operator/controllers/ray/utils/util.go.
    cluster_one = one["RayService"]["spec"]["rayClusterConfig"]
    cluster_five = five["RayService"]["spec"]["rayClusterConfig"]
    assert cluster_hash(cluster_one) == cluster_hash(cluster_five)
    (group,) = cluster_five["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (5, 1, 8)
    for cluster in (cluster_one, cluster_five):
        for group in cluster["workerGroupSpecs"]:
            del group["replicas"]
    assert cluster_one == cluster_five
    app_one = yaml.safe_load(one["RayService"]["spec"]["serveConfigV2"])["applications"][0]
    app_five = yaml.safe_load(five["RayService"]["spec"]["serveConfigV2"])["applications"][0]
    assert app_one["args"] == app_five["args"]
    llm = [d for d in app_five["deployments"] if d["name"].startswith("llm-")]
    assert [d["autoscaling_config"]["min_replicas"] for d in llm] == [5]
    assert [d["autoscaling_config"]["max_replicas"] for d in llm] == [5]
    assert all("num_replicas" not in d for d in llm)


def test_gpu_worker_group_requests_gpus_and_tolerates_the_taint() -> None:
    objs = {o["kind"]: o for o in render(load(ROOT / "deploy" / "examples" / "llama-70b-tp.yaml"))}
    group = objs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert group["rayStartParams"]["num-gpus"] == "4"
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["priorityClassName"] == "llm-serving"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
    assert mount["readOnly"] is True
    assert pod["terminationGracePeriodSeconds"] > 300  # drain (300 s) + margin
    assert objs["RayService"]["spec"]["upgradeStrategy"] == {"type": "None"}


def test_scaled_object_uses_the_shared_trigger_queries() -> None:
    manifest = load(ROOT / "deploy" / "examples" / "llama-8b-gpu.yaml")
    defaults = RenderDefaults(prometheus_url="http://prom.example:9090")
    scaled = next(o for o in render(manifest, defaults) if o["kind"] == "ScaledObject")
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    ns, name, model = "llmops-demo", "llama-8b", "llama-3.1-8b-instruct"
    assert (
        triggers["gpu-utilization"]["metadata"]["query"]
        == queries.gpu_utilization(ns, name, model).query
    )
    assert (
        triggers["queue-depth"]["metadata"]["query"] == queries.queue_depth(ns, name, model).query
    )
    assert (
        triggers["kv-cache-usage"]["metadata"]["query"]
        == queries.kv_cache_usage(ns, name, model).query
    )
    assert triggers["held-requests"]["metadata"]["query"] == queries.held_requests(model).query
    assert triggers["queue-depth"]["metricType"] == "AverageValue"
    assert all(
        t["metadata"]["serverAddress"] == "http://prom.example:9090" for t in triggers.values()
    )
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "LLMModel",
        "name": f"{name}-{model}",
    }
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_disabled_target_drops_its_trigger_and_disabled_autoscaling_drops_keda() -> None:
    manifest = load(ROOT / "deploy" / "examples" / "llama-70b-tp.yaml")
    scaled = next(o for o in render(manifest) if o["kind"] == "ScaledObject")
    assert {t["name"] for t in scaled["spec"]["triggers"]} == {
        "queue-depth",
        "kv-cache-usage",
        "held-requests",
    }
    tiny = load(ROOT / "deploy" / "examples" / "tiny-cpu.yaml")
    assert "ScaledObject" not in {o["kind"] for o in render(tiny)}

"""What the renderer must get right against the real KubeRay, Ray Serve and HPA.

Each test names the upstream rule it reproduces; each fails on a renderer that ignores it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from llmops_contract.tracing import tracing_env
from llmops_operator import render
from llmops_operator.render import Observed, RenderError
from llmops_operator.settings import OperatorSettings
from tests.schemas import assert_valid, schema_errors

ROOT = Path(__file__).parents[3]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
UID = "0b7c6a9e-1f2d-4c3b-9a8e-7d6c5b4a3f21"


def load(name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "examples" / name).read_text())
    return manifest


def children(
    manifest: dict[str, Any], observed: Observed | None = None
) -> dict[str, dict[str, Any]]:
    target = render.parse_manifest(manifest)
    objs = render.render_target(
        target, render.RenderDefaults(), render.graph_config(target), observed
    )
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def rayservice(manifest: dict[str, Any], observed: Observed | None = None) -> dict[str, Any]:
    return next(o for o in children(manifest, observed).values() if o["kind"] == "RayService")


def serve_config(manifest: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rayservice(manifest)["spec"]["serveConfigV2"])
    return config


# --- Ray Serve: ray/serve/schema.py is what PUT /api/serve/applications/ validates -----------


def test_ray_refuses_zero_num_replicas() -> None:
    """The rule the renderer must respect: num_replicas is a PositiveInt in ray 2.60."""
    config = serve_config(load("tiny-cpu.yaml"))
    llm = next(d for d in config["applications"][0]["deployments"] if d["name"].startswith("llm-"))
    llm.pop("autoscaling_config")
    llm["num_replicas"] = 0
    with pytest.raises(ValidationError, match="num_replicas"):
        ServeDeploySchema.model_validate(config)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("replicas", [0, 1, 3])
def test_every_example_at_any_replica_count_is_a_config_ray_accepts(
    example: Path, replicas: int
) -> None:
    manifest = yaml.safe_load(example.read_text())
    manifest["spec"]["replicas"] = replicas
    for model in manifest["spec"]["models"]:
        model.pop("replicas", None)  # spec.replicas is where models without their own start
    config = serve_config(manifest)
    ServeDeploySchema.model_validate(config)
    llms = [d for d in config["applications"][0]["deployments"] if d["name"].startswith("llm-")]
    assert llms
    for deployment in llms:
        bounds = deployment["autoscaling_config"]
        assert "num_replicas" not in deployment  # switching forms restarts the application
        assert bounds["min_replicas"] == replicas
        assert bounds["initial_replicas"] == replicas
        assert bounds["max_replicas"] == max(replicas, 1)


@settings(max_examples=60, deadline=None)
@given(
    replicas=st.integers(min_value=0, max_value=1024),
    low=st.integers(min_value=0, max_value=8),
    extra=st.integers(min_value=0, max_value=8),
    to_zero=st.booleans(),
)
def test_generated_scale_specs_render_configs_ray_accepts(
    replicas: int, low: int, extra: int, to_zero: bool
) -> None:
    manifest = load("llama-8b-gpu.yaml")
    manifest["spec"]["replicas"] = replicas
    manifest["spec"]["autoscaling"].update(
        minReplicas=low, maxReplicas=max(low, 1) + extra, scaleToZero=to_zero
    )
    assert schema_errors(manifest) == []
    objs = children(manifest)
    ServeDeploySchema.model_validate(
        yaml.safe_load(objs["RayService/llama-8b"]["spec"]["serveConfigV2"])
    )
    scaled = objs["ScaledObject/llama-8b-llama-3.1-8b-instruct"]["spec"]
    assert scaled["minReplicaCount"] == (0 if to_zero else low)
    assert_valid(objs.values())


def test_min_replicas_zero_is_accepted_and_means_scale_to_zero() -> None:
    manifest = load("llama-8b-gpu.yaml")
    manifest["spec"]["autoscaling"]["minReplicas"] = 0
    assert schema_errors(manifest) == []
    objs = children(manifest)
    assert objs["ScaledObject/llama-8b-llama-3.1-8b-instruct"]["spec"]["minReplicaCount"] == 0
    group = objs["RayService/llama-8b"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0


# --- KubeRay: names, labels, the change hash -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [("a" * 48, "at most 47"), ("Llama", "DNS-1035"), ("8b-llama", "DNS-1035"), ("x_y", "DNS")],
)
def test_names_kuberay_refuses_are_refused_by_the_crd_and_the_renderer(
    name: str, problem: str
) -> None:
    """ray-operator/controllers/ray/utils/validation.go: RayService names <= 47, DNS-1035."""
    manifest = load("tiny-cpu.yaml")
    manifest["metadata"]["name"] = name
    errors = schema_errors(manifest)
    assert errors
    assert problem in errors[0]
    with pytest.raises(RenderError, match="KubeRay"):
        render.render(manifest)


def test_the_longest_name_makes_names_the_api_server_accepts() -> None:
    manifest = load("llama-70b-tp.yaml")  # a shared cache: PVC and loader Job
    manifest["metadata"]["name"] = "a" * render.MAX_NAME_LENGTH
    # The LLMModel `<deployment>-<model>` must stay a label value (63): 15 characters left.
    manifest["spec"]["models"][0]["name"] = "llama-3.1-70b-i"
    objs = children(manifest, Observed(secret_version="123"))
    job = next(o for o in objs.values() if o["kind"] == "Job")
    # Job names end up in the pods' job-name label: at most 63 characters.
    assert len(job["metadata"]["name"]) <= 63
    (model,) = [o for o in objs.values() if o["kind"] == "LLMModel"]
    assert len(model["metadata"]["name"]) == 63
    assert_valid(objs.values())


def test_a_model_object_name_over_63_characters_is_refused_naming_both_parts() -> None:
    """KEDA labels a ScaledObject's HPA with its name (scaledobject.keda.sh/name), and label
    values hold at most 63 characters (k8s.io/apimachinery/pkg/util/validation)."""
    manifest = load("llama-70b-tp.yaml")
    manifest["metadata"]["name"] = "a" * render.MAX_NAME_LENGTH
    manifest["spec"]["models"][0]["name"] = "llama-3.1-70b-in"
    with pytest.raises(render.RenderError, match="64 characters, over 63") as refused:
        children(manifest)
    assert refused.value.reason == "NameTooLong"
    assert "shorten metadata.name or the model name" in str(refused.value)


@pytest.mark.parametrize(
    ("change", "rolls"),
    [
        (lambda s: s.update(replicas=7), False),
        (lambda s: s["autoscaling"].update(maxReplicas=16), False),
        (lambda s: s["autoscaling"].update(minReplicas=0), False),
        (lambda s: s["models"][0]["resources"].update(memory="64Gi"), True),
        (lambda s: s.update(tolerations=[{"key": "x", "operator": "Exists"}]), True),
        (lambda s: s["images"].update(worker="registry.example/llmops:2"), True),
    ],
)
def test_cluster_hash_follows_pod_changes_and_ignores_bounds(change: Any, rolls: bool) -> None:
    """KubeRay leaves Replicas/MinReplicas/MaxReplicas (and, since 1.6, tolerations) out of its
    cluster hash (ray-operator/controllers/ray/utils/util.go,
    GenerateHashWithoutReplicasAndWorkersToDelete). Our annotation on the head template
    carries every pod change into that hash."""
    base = load("llama-8b-gpu.yaml")
    base["spec"].setdefault("images", {})
    changed = copy.deepcopy(base)
    change(changed["spec"])

    def stamp(manifest: dict[str, Any]) -> str:
        head = rayservice(manifest)["spec"]["rayClusterConfig"]["headGroupSpec"]
        value: str = head["template"]["metadata"]["annotations"][render.CLUSTER_HASH_ANNOTATION]
        return value

    assert (stamp(base) != stamp(changed)) is rolls


def test_recreate_asks_kuberay_for_no_new_cluster() -> None:
    spec = rayservice(load("llama-70b-tp.yaml"))["spec"]
    assert spec["upgradeStrategy"] == {"type": "None"}
    assert rayservice(load("llama-8b-gpu.yaml"))["spec"]["upgradeStrategy"] == {
        "type": "NewCluster"
    }


def test_service_selects_only_the_active_clusters_pods() -> None:
    """KubeRay sets ray.io/serve=true on a pending cluster's pods too."""
    manifest = load("tiny-cpu.yaml")
    before = children(manifest)["Service/tiny"]["spec"]["selector"]
    assert render.RAY_CLUSTER_LABEL not in before
    after = children(manifest, Observed(active_cluster="tiny-x7k2p"))["Service/tiny"]
    assert after["spec"]["selector"] == {
        render.DEPLOYMENT_LABEL: "tiny",
        "ray.io/serve": "true",
        render.RAY_CLUSTER_LABEL: "tiny-x7k2p",
    }


def _pod_labels(name: str, node_type: str, group: str) -> dict[str, str]:
    """Labels on a KubeRay pod: ours from the template plus KubeRay's
    (ray-operator/controllers/ray/common/pod.go, utils/constant.go)."""
    target = render.parse_manifest(load("semantic-routing.yaml"))
    return {
        **render.labels(target, "ray"),
        render.RAY_CLUSTER_LABEL: f"{name}-abcde",
        render.RAY_NODE_TYPE_LABEL: node_type,
        render.RAY_GROUP_LABEL: group,
    }


def _matches(selector: str, pod: dict[str, str]) -> bool:
    return all(pod.get(k) == v for k, v in (term.split("=") for term in selector.split(",")))


def test_scale_selector_matches_one_models_workers_only() -> None:
    manifest = load("semantic-routing.yaml")
    name = manifest["metadata"]["name"]
    models = [m["name"] for m in manifest["spec"]["models"]]
    pods = [_pod_labels(name, "head", "headgroup")]
    pods += [_pod_labels(name, "worker", model) for model in models for _ in range(3)]
    selector = render.worker_selector(name, models[0])
    assert sum(_matches(selector, pod) for pod in pods) == 3


# --- the model cache -------------------------------------------------------------------------


def test_default_cache_is_a_volume_per_pod_filled_by_an_init_container() -> None:
    """Default StorageClasses offer ReadWriteOnce only; an RWO claim shared by pods on two
    nodes fails with Multi-Attach. No shared PVC, no loader Job."""
    objs = children(load("llama-8b-gpu.yaml"))
    assert {o["kind"] for o in objs.values()} & {"PersistentVolumeClaim", "Job"} == set()
    cluster = objs["RayService/llama-8b"]["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]:
        pod = template["spec"]
        cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
        claim = cache["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["accessModes"] == ["ReadWriteOnce"]
        assert claim["resources"]["requests"]["storage"] == "40Gi"
        init = pod["initContainers"][0]
        assert init["name"] == "fetch-models"
        assert init["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
        assert "envFrom" not in pod["containers"][0]  # the token stays with the loader
    worker_init = cluster["workerGroupSpecs"][0]["template"]["spec"]["initContainers"][0]
    head_init = cluster["headGroupSpec"]["template"]["spec"]["initContainers"][0]
    llama = "hf://meta-llama/Llama-3.1-8B-Instruct"
    assert llama in worker_init["command"]
    assert llama not in head_init["command"]  # the head offers no GPU: no GPU model lands there


def test_shared_cache_has_a_loader_job_renamed_by_a_new_secret_version() -> None:
    manifest = load("llama-70b-tp.yaml")
    one = children(manifest, Observed(secret_version="100"))
    two = children(manifest, Observed(secret_version="101"))
    jobs = [next(k for k in objs if k.startswith("Job/")) for objs in (one, two)]
    assert jobs[0] != jobs[1]
    assert "PersistentVolumeClaim/llama-70b-model-cache" in one
    loader = one[jobs[0]]["spec"]["template"]["spec"]["containers"][0]
    assert loader["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    pod = one["RayService/llama-70b"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert pod["spec"]["initContainers"][0]["name"] == "wait-for-model-cache"
    assert re.fullmatch(r"llama-70b-load-[0-9a-f]{10}", jobs[0].split("/")[1])


def _ray_pods(objs: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    cluster = objs[f"RayService/{name}"]["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


@pytest.mark.parametrize("access_mode", ["ReadWriteOnce", "ReadWriteMany"])
def test_pvc_sources_are_mounted_read_only_and_never_fetched(access_mode: str) -> None:
    """pvc://<claim>/<folder> is read in place: every Ray pod mounts the claim read-only and the
    graph loads the folder there; no loader copies it. With every source on claims there is
    no cache to fill, so no loader Job even for ReadWriteMany."""
    manifest = load("tiny-cpu.yaml")
    manifest["spec"]["models"][0]["source"] = "pvc://team-models/smollm2/v1"
    manifest["spec"]["encoder"] = {"source": "pvc://shared.models/minilm"}
    manifest["spec"]["cache"]["accessMode"] = access_mode
    objs = children(manifest)
    assert_valid(list(objs.values()))
    assert not any(key.startswith(("Job/", "PersistentVolumeClaim/")) for key in objs)
    for pod in _ray_pods(objs, "tiny"):
        assert not pod["initContainers"]  # nothing to fetch or wait for
        claims = {
            v["persistentVolumeClaim"]["claimName"]: v["name"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert set(claims) == {"team-models", "shared.models"}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        for claim, volume in claims.items():
            assert mounts[volume] == {
                "name": volume,
                "mountPath": f"/mnt/llmops-sources/{claim}",
                "readOnly": True,
            }
    graph = serve_config(manifest)["applications"][0]["args"]
    assert graph["llms"][0]["source"] == "/mnt/llmops-sources/team-models/smollm2/v1"
    assert graph["encoder"]["source"] == "/mnt/llmops-sources/shared.models/minilm"
    ServeDeploySchema.model_validate(serve_config(manifest))


def test_s3_sources_are_fetched_with_the_credentials_and_read_offline() -> None:
    """s3:// goes through the loader like hf://: the Secret's AWS_* keys reach the fetch
    container only; Ray containers read the cache with LLMOPS_OFFLINE=1."""
    manifest = load("tiny-cpu.yaml")
    manifest["spec"]["models"][0]["source"] = "s3://models/smollm2/v1"
    manifest["spec"]["cache"]["credentialsSecret"] = "s3-keys"
    objs = children(manifest)
    assert_valid(list(objs.values()))
    for pod in _ray_pods(objs, "tiny"):
        (fetch,) = pod["initContainers"]
        assert "s3://models/smollm2/v1" in fetch["command"]
        assert fetch["command"][fetch["command"].index("--report") + 1] == "/dev/termination-log"
        assert fetch["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert fetch["envFrom"] == [{"secretRef": {"name": "s3-keys"}}]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["LLMOPS_OFFLINE"] == "1"
        assert "envFrom" not in pod["containers"][0]


# --- network access ----------------------------------------------------------------------------


def test_only_the_gateway_reaches_the_serve_port() -> None:
    """NetworkPolicy semantics (k8s.io/api/networking/v1): a pod selected by a policy accepts
    only what some ingress rule allows; peers in one rule entry are ANDed."""
    settings = OperatorSettings(
        gateway_namespace="edge", gateway_pod_labels={"app.kubernetes.io/component": "gateway"}
    )
    target = render.parse_manifest(load("tiny-cpu.yaml"))
    defaults = render.RenderDefaults.from_settings(settings)
    objs = render.render_target(target, defaults, render.graph_config(target))
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy")
    assert_valid([policy])
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {render.DEPLOYMENT_LABEL: "tiny"}}
    assert spec["policyTypes"] == ["Ingress"]  # loaders still download

    def allowed(port: int, namespace: str, pod: dict[str, str]) -> bool:
        for rule in spec["ingress"]:
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            for peer in rule["from"]:
                ns_sel = peer.get("namespaceSelector")
                ns_ok = (
                    namespace == "llmops-demo"
                    if ns_sel is None
                    else all(
                        {"kubernetes.io/metadata.name": namespace}.get(k) == v
                        for k, v in ns_sel.get("matchLabels", {}).items()
                    )
                )
                pod_sel = peer.get("podSelector", {})
                pod_ok = all(pod.get(k) == v for k, v in pod_sel.get("matchLabels", {}).items())
                if ns_ok and pod_ok:
                    return True
        return False

    gateway = {"app.kubernetes.io/component": "gateway"}
    assert allowed(8000, "edge", gateway)
    assert not allowed(8000, "llmops-demo", {"app": "curious"})  # a pod beside the graph
    assert not allowed(8000, "other", gateway)  # a gateway-labelled pod elsewhere
    assert not allowed(8265, "edge", gateway)
    assert allowed(8080, "monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert not allowed(8000, "monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert allowed(8265, "ray-system", {"app.kubernetes.io/name": "kuberay-operator"})
    assert allowed(6379, "llmops-demo", {render.DEPLOYMENT_LABEL: "tiny"})  # Ray's own traffic


def test_network_policy_can_be_left_to_the_platform() -> None:
    target = render.parse_manifest(load("tiny-cpu.yaml"))
    defaults = render.RenderDefaults.from_settings(OperatorSettings(network_policy=False))
    kinds = {o["kind"] for o in render.render_target(target, defaults, render.graph_config(target))}
    assert "NetworkPolicy" not in kinds


def test_tracing_setting_reaches_every_ray_container() -> None:
    """With an OTLP endpoint, each Ray container gets the environment the graph's tracing
    reads (llmops_contract.tracing), so Ray Serve, the router, the LLM deployments and vLLM
    export spans; without one, none of it."""
    settings = OperatorSettings(
        otlp_traces_endpoint="http://otel-collector.monitoring:4318/v1/traces", trace_sample=0.25
    )
    traced = render.RenderDefaults.from_settings(settings)
    target = render.parse_manifest(load("llama-8b-gpu.yaml"))
    objs = render.render_target(target, traced, render.graph_config(target), None)
    cluster = next(o for o in objs if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    expected = tracing_env("http://otel-collector.monitoring:4318/v1/traces", 0.25)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in expected} == expected
    assert_valid(objs)

    plain = render.RenderDefaults.from_settings(OperatorSettings())
    objs = render.render_target(target, plain, render.graph_config(target), None)
    text = yaml.safe_dump(next(o for o in objs if o["kind"] == "RayService"))
    assert "RAY_SERVE_TRACING" not in text
    assert "OTEL_" not in text

"""KEDA trigger queries on Prometheus' engine, over series labelled as a real cluster has them.

`promtool test rules` evaluates every query of llmops_operator.queries, exactly as the operator
renders it into ScaledObjects, over synthetic series whose names and labels reproduce what
Prometheus stores in a cluster:

- DCGM GPU series are scraped through the GPU Operator's ServiceMonitor, which keeps
  `honorLabels: false` (NVIDIA/gpu-operator deployments/gpu-operator/values.yaml,
  dcgmExporter.serviceMonitor.honorLabels; the endpoint in
  assets/state-dcgm-exporter/0500_service_monitor.yaml sets none, and jobLabel is `app`).
  The exporter's own `pod`, `namespace` and `container` (NVIDIA/dcgm-exporter
  internal/pkg/transformation/const.go) collide with the target labels Prometheus Operator
  adds, so they are stored as `exported_pod`, `exported_namespace` and `exported_container`.
- GPU pods are named as KubeRay >= 1.4 names them: cluster `<rayservice>-<5 random>`
  (ray-project/kuberay ray-operator/controllers/ray/utils/util.go, GenerateRayClusterName),
  pods `<cluster>-<group>` cut to 50 characters, then `-worker-` and the API server's five
  random characters (utils.PodName), from k8s.io/apimachinery/pkg/util/rand's alphabet.
- Ray and vLLM series are scraped by the deployment's PodMonitor (render.pod_monitor), which
  adds `llmops_deployment` and `ray_group` to Prometheus Operator's target labels.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops_operator import queries

NS = "ml"

# --- DCGM series ------------------------------------------------------------------------------

# dcgm-exporter internal/pkg/rendermetrics/render_metrics.go (gpuMetricsFormat): every GPU
# series carries gpu, UUID, pci_bus_id, device, modelName and hostname (named Hostname before
# commit d5e5f51), the "label" fields of its collectors file (DCGM_FI_DRIVER_VERSION in
# etc/dcp-metrics-included.csv, the file the GPU Operator's DaemonSet selects in
# assets/state-dcgm-exporter/0800_daemonset.yaml, with DCGM_EXPORTER_KUBERNETES=true), then the
# GPU's pod, namespace and container (internal/pkg/transformation/kubernetes.go).
EXPORTER_NODE = {
    "DCGM_FI_DRIVER_VERSION": "570.124.06",
    "modelName": "NVIDIA H100 80GB HBM3",
    "hostname": "gpu-node-1",
}
# What Prometheus Operator adds for the GPU Operator's ServiceMonitor endpoint: the exporter
# pod's own namespace, pod and container, the Service and its port name
# (assets/state-dcgm-exporter/0400_service.yaml), and job from the Service's `app` label
# (jobLabel).
EXPORTER_TARGET = {
    "namespace": "gpu-operator",
    "pod": "nvidia-dcgm-exporter-7xk2p",
    "container": "nvidia-dcgm-exporter",
    "service": "nvidia-dcgm-exporter",
    "endpoint": "gpu-metrics",
    "job": "nvidia-dcgm-exporter",
    "instance": "10.244.1.7:9400",
}


def labels(values: dict[str, str]) -> str:
    return ",".join(f'{name}="{value}"' for name, value in values.items())


def dcgm(
    metric: str, pod: str | None, gpu: int, value: float, *, namespace: str = NS, honor: bool
) -> dict[str, str]:
    """One GPU's series as stored after the scrape; ``pod=None`` is a GPU no pod holds.

    ``honor`` is a scrape with ``honorLabels: true``: the exporter's labels win collisions.
    """
    gpu_labels = {
        "gpu": str(gpu),
        "UUID": f"GPU-6e1b4c2a-0000-4f00-9000-00000000000{gpu}",
        "pci_bus_id": f"00000000:{gpu + 0x18:02X}:00.0",
        "device": f"nvidia{gpu}",
        **EXPORTER_NODE,
    }
    attributes = (
        {} if pod is None else {"pod": pod, "namespace": namespace, "container": "ray-worker"}
    )
    if honor:
        stored = {**EXPORTER_TARGET, **gpu_labels, **attributes}
    else:
        renamed = {f"exported_{name}": value for name, value in attributes.items()}
        stored = {**gpu_labels, **renamed, **EXPORTER_TARGET}
    return series(metric, labels(stored), value)


def series(name: str, label_text: str, value: float) -> dict[str, str]:
    return {"series": f"{name}{{{label_text}}}", "values": f"{value}x10"}


# KubeRay >= 1.4 names (the 5-character suffixes use only "bcdfghjklmnpqrstvwxz2456789").
CLUSTER = "llama-x7k2p"  # the active cluster of RayService "llama"
OLD_CLUSTER = "llama-raycluster-q2w4b"  # made by KubeRay < 1.4, kept across the upgrade
LLAMA_WORKER = f"{CLUSTER}-llama-3-worker-bc4df"
MISTRAL_WORKER = f"{CLUSTER}-mistral-worker-zz9nt"
OLD_WORKER = f"{OLD_CLUSTER}-llama-3-worker-h5f2d"
HEAD = f"{CLUSTER}-head-8ljvs"
OTHER_WORKER = "llama-2-vv5rt-llama-3-worker-kq7wc"  # RayService "llama-2" starts alike


def gpu_series(*, honor: bool) -> list[dict[str, str]]:
    gpu = queries.DCGM_GPU_UTIL
    return [
        # This deployment's GPU workers, two models and a cluster of the old naming: they count.
        dcgm(gpu, LLAMA_WORKER, 0, 80, honor=honor),
        dcgm(gpu, MISTRAL_WORKER, 1, 60, honor=honor),
        dcgm(gpu, OLD_WORKER, 2, 40, honor=honor),
        # A head holding a GPU, another deployment's worker, the same name in another namespace
        # and a GPU no pod holds: none of them count.
        dcgm(gpu, HEAD, 3, 0, honor=honor),
        dcgm(gpu, OTHER_WORKER, 4, 5, honor=honor),
        dcgm(gpu, LLAMA_WORKER, 5, 1, namespace="other", honor=honor),
        dcgm(gpu, None, 6, 0, honor=honor),
    ]


# Names long enough for KubeRay to cut them: a 40-character RayService whose group name is cut,
# and a 47-character one (KubeRay's maximum) whose cluster suffix is cut to two characters.
LONG = "customer-support-assistant-production-eu"
LONGEST = "customer-support-assistant-production-eu-west-1"


def long_name_series(*, honor: bool) -> list[dict[str, str]]:
    gpu = queries.DCGM_GPU_UTIL
    long_worker = f"{LONG}-x7k2p-llama-3-1-8b-instruct"[:50] + "-worker-bc4df"
    longest_worker = f"{LONGEST}-x7k2p-llama-3-1-8b-instruct"[:50] + "-worker-zz9nt"
    assert long_worker == f"{LONG}-x7k2p-lla-worker-bc4df"
    assert longest_worker == f"{LONGEST}-x7-worker-zz9nt"
    return [
        dcgm(gpu, long_worker, 0, 40, honor=honor),
        dcgm(gpu, longest_worker, 1, 90, honor=honor),
        dcgm(gpu, f"{LONG}-x7k2p-head-8ljvs", 2, 0, honor=honor),
    ]


def per_group_gpu_series() -> list[dict[str, str]]:
    """Workers of three groups whose names share prefixes: only the named group counts."""
    gpu = queries.DCGM_GPU_UTIL
    return [
        dcgm(gpu, f"{CLUSTER}-llama-3-worker-bc4df", 0, 90, honor=False),
        dcgm(gpu, f"{CLUSTER}-llama-3-large-worker-bc4dg", 1, 10, honor=False),
        dcgm(gpu, f"{CLUSTER}-llama-3x1-worker-bc4dh", 2, 70, honor=False),  # not "llama-3.1"
        dcgm(gpu, f"{CLUSTER}-llama-3.1-worker-bc4dj", 3, 20, honor=False),
        dcgm(gpu, MISTRAL_WORKER, 4, 30, honor=False),
    ]


def held_series() -> list[dict[str, str]]:
    """llmops_gateway_held_requests as the gateway's PodMonitor stores it: one series per
    gateway pod and model (gateway/llmops_gateway/metrics.py)."""
    target = {"namespace": "llmops-system", "container": "gateway", "job": "llmops-gateway"}
    found = []
    for pod, model, value in (
        ("gw-a", "llama-3", 2),
        ("gw-b", "llama-3", 1),
        ("gw-a", "mistral", 0),
    ):
        stored = {"model": model, **target, "pod": f"llmops-gateway-7d9f-{pod}"}
        found.append(series(queries.HELD_REQUESTS_METRIC, labels(stored), value))
    return found


# --- Ray and vLLM series, as the deployment's PodMonitor stores them --------------------------


def pod_monitor_target(pod: str, group: str, deployment: str = "llama") -> dict[str, str]:
    """Prometheus Operator's target labels for a PodMonitor endpoint, plus render.pod_monitor's
    relabelings (pod labels llmops.dev/deployment and ray.io/group)."""
    return {
        "namespace": NS,
        "pod": pod,
        "container": "ray-head" if group == "headgroup" else "ray-worker",
        "endpoint": "metrics",
        "job": f"{NS}/{deployment}",
        "instance": "10.244.2.9:8080",
        "llmops_deployment": deployment,
        "ray_group": group,
    }


def vllm(
    metric: str, pod: str, group: str, value: float, deployment: str = "llama"
) -> dict[str, str]:
    # vllm/v1/metrics/loggers.py labels engine gauges with model_name and engine.
    own = {"model_name": group, "engine": "0"}
    return series(metric, labels({**own, **pod_monitor_target(pod, group, deployment)}), value)


def serve_queue(deployment: str, value: float, owner: str = "llama") -> dict[str, str]:
    # ray/serve/_private/router.py: serve_deployment_queued_queries, reported by each handle
    # (here the proxy's, on the head pod).
    own = {"deployment": deployment, "application": "llmops", "handle": "h1", "actor_id": "a1"}
    head = HEAD if owner == "llama" else f"{owner}-vv5rt-head-m2tqx"
    target = pod_monitor_target(head, "headgroup", owner)
    return series(queries.SERVE_QUEUED, labels({**own, **target}), value)


def expect(query: queries.TriggerQuery, value: float) -> dict[str, Any]:
    return {
        "expr": query.query,
        "eval_time": "5m",
        "exp_samples": [{"labels": "{}", "value": value}],
    }


def expect_nothing(query: queries.TriggerQuery) -> dict[str, Any]:
    return {"expr": query.query, "eval_time": "5m", "exp_samples": []}


GpuQuery = Callable[[str, str], queries.TriggerQuery]


def trigger_tests(gpu_query: GpuQuery = queries.gpu_utilization) -> list[dict[str, Any]]:
    """promtool test groups for every trigger query; ``gpu_query`` makes the GPU one."""
    gpu = gpu_query(NS, "llama")
    queue = queries.queue_depth(NS, "llama", "llama-3")
    kv = queries.kv_cache_usage(NS, "llama", "llama-3")
    engines = [
        vllm(queries.VLLM_WAITING, LLAMA_WORKER, "llama-3", 3),
        vllm(queries.VLLM_WAITING, MISTRAL_WORKER, "mistral", 4),
        vllm(queries.VLLM_WAITING, OTHER_WORKER, "llama-3", 50, deployment="llama-2"),
        vllm(queries.VLLM_KV_CACHE_USAGE, LLAMA_WORKER, "llama-3", 0.5),
        vllm(queries.VLLM_KV_CACHE_USAGE, MISTRAL_WORKER, "mistral", 0.7),
        vllm(queries.VLLM_KV_CACHE_USAGE, OTHER_WORKER, "llama-3", 0.1, deployment="llama-2"),
        # Serve's queues in front of this deployment's LLMs count; the router's and another
        # deployment's do not.
        serve_queue("llm-llama-3", 5),
        serve_queue("router", 100),
        serve_queue("llm-llama-3", 20, owner="llama-2"),
    ]
    return [
        {
            "name": "gpu operator scrape (honorLabels false)",
            "interval": "1m",
            "input_series": gpu_series(honor=False) + engines,
            "promql_expr_test": [
                expect(gpu, 60),
                # One model's signals: its engines (vLLM's model_name) and its Serve queue.
                expect(queue, 8),
                expect(kv, 50),
                expect(queries.queue_depth(NS, "llama", "mistral"), 4),
                expect(queries.kv_cache_usage(NS, "llama", "mistral"), 70),
            ],
        },
        {
            "name": "one model's GPUs (its worker group's pods)",
            "interval": "1m",
            "input_series": per_group_gpu_series(),
            "promql_expr_test": [
                expect(queries.gpu_utilization(NS, "llama", "llama-3"), 90),
                expect(queries.gpu_utilization(NS, "llama", "mistral"), 30),
                expect(queries.gpu_utilization(NS, "llama", "llama-3.1"), 20),
            ],
        },
        {
            "name": "requests the gateway holds, per model, over its replicas",
            "interval": "1m",
            "input_series": held_series(),
            "promql_expr_test": [
                expect(queries.held_requests("llama-3"), 3),
                expect(queries.held_requests("mistral"), 0),
                expect_nothing(queries.held_requests("qwen")),
            ],
        },
        {
            "name": "scrape with honorLabels true",
            "interval": "1m",
            "input_series": gpu_series(honor=True),
            "promql_expr_test": [expect(gpu, 60)],
        },
        {
            "name": "names KubeRay cuts",
            "interval": "1m",
            "input_series": long_name_series(honor=False),
            "promql_expr_test": [
                expect(gpu_query(NS, LONG), 40),
                expect(gpu_query(NS, LONGEST), 90),
                # The group name cut to "lla" still tells it apart; at 47 characters nothing
                # of it is left and the model's query reads the deployment's workers.
                expect(queries.gpu_utilization(NS, LONG, "llama-3-1-8b-instruct"), 40),
                expect_nothing(queries.gpu_utilization(NS, LONG, "mistral")),
                expect(queries.gpu_utilization(NS, LONGEST, "llama-3-1-8b-instruct"), 90),
            ],
        },
        {
            "name": "scaled to zero: no engine runs, the Serve queue alone shows the demand",
            "interval": "1m",
            "input_series": [serve_queue("llm-llama-3", 2)],
            "promql_expr_test": [expect(queue, 2), expect_nothing(gpu), expect_nothing(kv)],
        },
        {
            "name": "idle",
            "interval": "1m",
            "input_series": [series("up", 'job="unrelated"', 1)],
            "promql_expr_test": [expect(queue, 0)],
        },
    ]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/setup installs it)")
    return found


def run_promtool(promtool: str, tests: list[dict[str, Any]], folder: Path) -> str:
    """`promtool test rules` on ``tests``; returns its output, failing or not."""
    (folder / "empty.yaml").write_text("groups: []\n")
    document = {"rule_files": ["empty.yaml"], "evaluation_interval": "1m", "tests": tests}
    (folder / "trigger_test.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", "trigger_test.yaml"],
        capture_output=True,
        text=True,
        cwd=folder,
        check=False,
    )
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


def test_trigger_queries_return_the_right_values(promtool: str, tmp_path: Path) -> None:
    out = run_promtool(promtool, trigger_tests(), tmp_path)
    assert out.startswith("rc=0\n"), out


def test_promtool_catches_a_wrong_value(promtool: str, tmp_path: Path) -> None:
    tests = trigger_tests()
    tests[0]["promql_expr_test"][0]["exp_samples"][0]["value"] = 61  # the GPU average is 60
    out = run_promtool(promtool, tests, tmp_path)
    assert not out.startswith("rc=0\n"), out


def test_the_exporter_pod_label_names_no_gpu_pod(promtool: str, tmp_path: Path) -> None:
    # What the GPU query selected before: `namespace` and `pod`. On the GPU Operator's scrape
    # they name the exporter, so the result is empty and KEDA reads it as 0% utilisation.
    pods = queries.worker_pod_regex("llama")
    selector = f'namespace="{NS}", pod=~"{pods}"'
    by_pod = queries.TriggerQuery("old", f"avg({queries.DCGM_GPU_UTIL}{{{selector}}})", "Value")
    test = {
        "interval": "1m",
        "input_series": gpu_series(honor=False),
        "promql_expr_test": [expect_nothing(by_pod)],
    }
    out = run_promtool(promtool, [test], tmp_path)
    assert out.startswith("rc=0\n"), out


@pytest.mark.parametrize(
    ("deployment", "pod", "matches"),
    [
        ("llama", LLAMA_WORKER, True),
        ("llama", OLD_WORKER, True),
        ("llama", HEAD, False),
        ("llama", OTHER_WORKER, False),
        ("llama", f"{CLUSTER}-llama-3-worker", False),  # a generateName, not a pod
        ("llama", "llama-x7k2a-llama-3-worker-bc4df", False),  # "a" is not KubeRay's
        # KubeRay < 1.4 allowed 36 characters: "-raycluster-" left room for 2 of the suffix.
        ("a" * 36, "a" * 36 + "-raycluster-x7-worker-bc4df", True),
        ("a" * 35, "a" * 36 + "-raycluster-x7-worker-bc4df", False),
    ],
)
def test_worker_pod_regex_on_prometheus(
    promtool: str, tmp_path: Path, deployment: str, pod: str, matches: bool
) -> None:
    # Prometheus anchors label regexes (RE2, full match): check the pattern with its engine.
    query = queries.TriggerQuery(
        "match",
        f'count(up{{pod=~"{queries.worker_pod_regex(deployment)}"}})',
        "Value",
    )
    test = {
        "interval": "1m",
        "input_series": [series("up", labels({"pod": pod}), 1)],
        "promql_expr_test": [expect(query, 1) if matches else expect_nothing(query)],
    }
    out = run_promtool(promtool, [test], tmp_path)
    assert out.startswith("rc=0\n"), out


def test_worker_pod_regex_refuses_a_name_that_would_need_escaping() -> None:
    with pytest.raises(ValueError, match="DNS label"):
        queries.worker_pod_regex("llama.3")

"""Pure renderers: an `LLMDeployment` manifest in, the Kubernetes objects it needs out.

`render` is the one code path behind both the operator and `llmops render`. It decides
nothing at serving time: the RayService's serveConfigV2 carries the services graph config
(`llmops_services.config.GraphConfig`, validated here), so the cluster runs the graph
`llmops up` runs locally.

Replica counts live in the serveConfigV2 ``deployments`` overrides, never in the
application ``args`` nor the Ray cluster config: a change of spec.replicas (as KEDA writes it)
is then a lightweight Serve update that keeps running replicas, and KubeRay applies it to the
running cluster in place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from llmops_operator import queries
from llmops_operator.models import API_VERSION, KIND, LLMDeploymentSpec, ModelSpec, parse_spec
from llmops_operator.settings import DEFAULT_WORKER_IMAGE, OperatorSettings
from llmops_services.config import GraphConfig

APP_NAME = "llmops"
DEPLOYMENT_LABEL = "llmops.dev/deployment"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = "llmops-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
CACHE_MOUNT = "/models"
READY_MARKER_DIR = ".llmops"
SERVE_PORT = 8000
METRICS_PORT = 8080
RAY_VERSION = "2.60.0"
RUN_AS_USER = 1000
HEAD_CPU = "4"
HEAD_MEMORY = "16Gi"
ROUTER_DEPLOYMENT = "router"
ENCODER_DEPLOYMENT = "encoder"


class RenderError(ValueError):
    """The manifest cannot be rendered; the message says what to fix."""


@dataclass(frozen=True)
class RenderDefaults:
    """Operator-wide values a manifest may leave out."""

    worker_image: str = DEFAULT_WORKER_IMAGE
    loader_image: str = DEFAULT_WORKER_IMAGE
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> RenderDefaults:
        """The defaults an operator with these settings renders with."""
        return cls(settings.worker_image, settings.loader_image, settings.prometheus_url)


@dataclass(frozen=True)
class Target:
    """The object being rendered: identity plus its validated spec."""

    name: str
    namespace: str
    uid: str | None
    spec: LLMDeploymentSpec


def parse_manifest(manifest: Mapping[str, Any]) -> Target:
    """Checks a manifest's kind and identity and validates its spec.

    Raises:
        RenderError: wrong kind, no name, or an invalid spec (with pydantic's field paths).
    """
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise RenderError(
            f"expected apiVersion {API_VERSION} and kind {KIND}, got "
            f"{manifest.get('apiVersion')!r} / {manifest.get('kind')!r}"
        )
    meta = manifest.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise RenderError("metadata.name is required")
    try:
        spec = parse_spec(dict(manifest.get("spec") or {}))
    except ValidationError as exc:
        raise RenderError(_explain(exc)) from exc
    return Target(name, meta.get("namespace") or "default", meta.get("uid"), spec)


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "spec"
        lines.append(f"spec.{where}: {error['msg']}" if where != "spec" else error["msg"])
    return "; ".join(lines)


def render(
    manifest: Mapping[str, Any], defaults: RenderDefaults | None = None
) -> list[dict[str, Any]]:
    """Every child object of an LLMDeployment, in apply order.

    Args:
        manifest: The LLMDeployment (apiVersion, kind, metadata, spec).
        defaults: Operator-wide defaults (images, Prometheus URL).

    Returns:
        PVC, loader Job, RayService, Service, then ScaledObject (when autoscaling is on) and
        PodMonitor. With metadata.uid set, each carries an owner reference to the manifest.

    Raises:
        RenderError: the manifest is invalid; nothing should be applied.
    """
    target = parse_manifest(manifest)
    return render_target(target, defaults or RenderDefaults(), graph_config(target))


def render_target(
    target: Target, defaults: RenderDefaults, graph: GraphConfig
) -> list[dict[str, Any]]:
    """`render` for an already parsed target and its validated graph config."""
    children = [
        cache_claim(target),
        cache_loader(target, defaults),
        ray_service(target, defaults, graph),
        graph_service(target),
    ]
    if target.spec.autoscaling.enabled:
        children.append(scaled_object(target, defaults))
    children.append(pod_monitor(target))
    if target.uid:
        for child in children:
            child["metadata"]["ownerReferences"] = [owner_reference(target)]
    return children


def owner_reference(target: Target) -> dict[str, Any]:
    """Makes a child garbage-collected with its LLMDeployment."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": target.name,
        "uid": target.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(target: Target, component: str) -> dict[str, str]:
    """Labels on every child; ``kubectl get all -l llmops.dev/deployment=NAME`` finds them."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": target.name,
        COMPONENT_LABEL: component,
        MANAGED_BY_LABEL: MANAGED_BY,
        DEPLOYMENT_LABEL: target.name,
    }


def _meta(target: Target, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": target.namespace, "labels": labels(target, component)}


def worker_selector(name: str) -> str:
    """Label selector of a deployment's Ray pods (status.selector for the scale subresource)."""
    return f"{DEPLOYMENT_LABEL}={name}"


# --- the graph config -------------------------------------------------------------------


def graph_config(target: Target) -> GraphConfig:
    """The services graph config (serveConfigV2 ``args``), validated by `GraphConfig`.

    Replica counts are fixed at 1 here; the real counts are Serve ``deployments`` overrides.
    """
    spec = target.spec
    semantic = spec.router.policy == "semantic"
    llms = [
        {
            "name": model.name,
            "source": model.source,
            "engine": model.engine.model_dump(mode="json"),
            "resources": {
                "cpus": 1.0,
                "gpus": model.resources.gpus,
                "accelerator_type": None,
            },
            "replicas": 1,
            "route_examples": list(model.route_examples) if semantic else [],
            "max_ongoing_requests": model.max_ongoing_requests,
            # vLLM on CPU makes a token every ~100 ms, slower than any useful batch interval.
            "stream_batching_interval_ms": 50.0 if model.resources.gpus else 0.0,
            "prefix_aware_routing": spec.router.policy == "prefix-aware",
        }
        for model in spec.models
    ]
    encoder = spec.encoder
    config = {
        "llms": llms,
        "encoder": {
            "name": encoder.name,
            "source": encoder.source,
            "max_batch_size": encoder.max_batch_size,
            "device": "cuda" if encoder.gpus else "cpu",
            "resources": {"cpus": 1.0, "gpus": encoder.gpus},
            "replicas": 1,
        }
        if encoder.enabled
        else None,
        "router": {
            "default_model": spec.router.default_model,
            "min_similarity": spec.router.min_similarity,
            "request_timeout_s": spec.router.request_timeout_seconds,
            "replicas": 1,
        },
        "model_cache_dir": CACHE_MOUNT,
    }
    try:
        return GraphConfig.model_validate(config)
    except ValidationError as exc:
        raise RenderError(f"the serving graph is invalid: {_explain(exc)}") from exc


def serve_config(target: Target, graph: GraphConfig) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2): one application built by `build_app`."""
    spec = target.spec
    drain = spec.rollout.drain_seconds
    deployments: list[dict[str, Any]] = [
        {
            "name": llm.deployment_name,
            "num_replicas": spec.replicas,
            "graceful_shutdown_timeout_s": drain,
        }
        for llm in graph.llms
    ]
    deployments.append({"name": ROUTER_DEPLOYMENT, "num_replicas": spec.router.replicas})
    if spec.encoder.enabled:
        deployments.append({"name": ENCODER_DEPLOYMENT, "num_replicas": spec.encoder.replicas})
    return {
        "applications": [
            {
                "name": APP_NAME,
                "import_path": "llmops_services.app:build_app",
                "route_prefix": "/",
                "args": graph.model_dump(mode="json"),
                "deployments": deployments,
            }
        ]
    }


# --- model cache ------------------------------------------------------------------------


def cache_claim_name(name: str) -> str:
    """The model cache PVC's name."""
    return f"{name}-model-cache"


def sources(spec: LLMDeploymentSpec) -> list[str]:
    """Every model source the cache must hold, in a stable order."""
    found = [model.source for model in spec.models]
    if spec.encoder.enabled:
        found.append(spec.encoder.source)
    return sorted(set(found))


def cache_key(spec: LLMDeploymentSpec) -> str:
    """Short hash of the cache contents; names the loader Job and its ready marker."""
    return hashlib.sha256(json.dumps(sources(spec)).encode()).hexdigest()[:10]


def loader_job_name(target: Target) -> str:
    """The loader Job's name: a new set of sources gets a new Job (pod specs are immutable)."""
    return f"{target.name}-cache-{cache_key(target.spec)}"


def ready_marker(spec: LLMDeploymentSpec) -> str:
    """File the loader writes into the cache when every source is in it."""
    return f"{CACHE_MOUNT}/{READY_MARKER_DIR}/ready-{cache_key(spec)}"


def cache_claim(target: Target) -> dict[str, Any]:
    """The model cache volume, sized for all models of the deployment."""
    cache = target.spec.cache
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(target, cache_claim_name(target.name), "model-cache"),
        "spec": spec,
    }


def _restricted_container() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def cache_loader(target: Target, defaults: RenderDefaults) -> dict[str, Any]:
    """A Job that downloads every source into the cache once, then writes the ready marker."""
    spec = target.spec
    image = spec.images.loader or defaults.loader_image
    command = [
        "llmops",
        "fetch",
        "--cache-dir",
        CACHE_MOUNT,
        "--marker",
        ready_marker(spec),
        *sources(spec),
    ]
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "securityContext": _pod_security(),
        "containers": [
            {
                "name": "loader",
                "image": image,
                "command": command,
                "env": [{"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"}],
                "resources": {
                    "requests": {"cpu": "1", "memory": "4Gi"},
                    "limits": {"cpu": "4", "memory": "16Gi"},
                },
                "securityContext": _restricted_container(),
                "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_MOUNT}],
            }
        ],
        "volumes": [
            {
                "name": "model-cache",
                "persistentVolumeClaim": {"claimName": cache_claim_name(target.name)},
            }
        ],
    }
    _place(pod, spec, gpus=0)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(target, loader_job_name(target), "model-loader"),
        "spec": {
            "backoffLimit": 4,
            "template": {"metadata": {"labels": labels(target, "model-loader")}, "spec": pod},
        },
    }


# --- the Ray cluster --------------------------------------------------------------------


def _place(
    pod: dict[str, Any], spec: LLMDeploymentSpec, gpus: int, gpu_type: str | None = None
) -> None:
    node_selector = dict(spec.node_selector)
    if gpu_type:
        node_selector["nvidia.com/gpu.product"] = gpu_type
    if node_selector:
        pod["nodeSelector"] = node_selector
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    if gpus and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod["tolerations"] = tolerations
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name


def _ray_container(
    target: Target,
    name: str,
    image: str,
    resources: dict[str, Any],
    ports: list[dict[str, Any]],
) -> dict[str, Any]:
    drain = target.spec.rollout.drain_seconds
    return {
        "name": name,
        "image": image,
        "ports": ports,
        "env": [
            {"name": "LLMOPS_MODEL_CACHE", "value": CACHE_MOUNT},
            # Workers only read the cache the loader filled.
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "RAY_SERVE_ENABLE_TASK_EVENTS", "value": "0"},
        ],
        "resources": resources,
        "securityContext": _restricted_container(),
        "lifecycle": {
            "preStop": {"exec": {"command": ["/bin/sh", "-c", f"ray stop --grace-period {drain}"]}}
        },
        "volumeMounts": [
            {"name": "model-cache", "mountPath": CACHE_MOUNT, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},  # noqa: S108 (Ray's object store)
        ],
    }


def _pod_volumes(target: Target) -> list[dict[str, Any]]:
    return [
        {
            "name": "model-cache",
            "persistentVolumeClaim": {
                "claimName": cache_claim_name(target.name),
                "readOnly": True,
            },
        },
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]


def _wait_for_cache(target: Target, image: str) -> dict[str, Any]:
    marker = ready_marker(target.spec)
    return {
        "name": "wait-for-model-cache",
        "image": image,
        "command": [
            "/bin/sh",
            "-c",
            f'until [ -f "{marker}" ]; do echo "waiting for the model cache"; sleep 5; done',
        ],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": _restricted_container(),
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_MOUNT, "readOnly": True}],
    }


def _pod_template(
    target: Target, container: dict[str, Any], image: str, gpus: int, gpu_type: str | None
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": target.spec.rollout.drain_seconds + 30,
        "initContainers": [_wait_for_cache(target, image)],
        "containers": [container],
        "volumes": _pod_volumes(target),
    }
    _place(pod, target.spec, gpus, gpu_type)
    return {"metadata": {"labels": labels(target, "ray")}, "spec": pod}


def _worker_group(target: Target, model: ModelSpec, image: str) -> dict[str, Any]:
    spec = target.spec
    res = model.resources
    limits: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        limits["nvidia.com/gpu"] = res.gpus
    autoscaling = spec.autoscaling
    if autoscaling.enabled:
        low = 0 if autoscaling.scale_to_zero else autoscaling.min_replicas
        high = autoscaling.max_replicas
    else:
        # Without KEDA, replicas are set by hand; room to grow without a new Ray cluster.
        low, high = 0, max(spec.replicas, 1) * 4
    container = _ray_container(
        target,
        "ray-worker",
        image,
        {"requests": dict(limits), "limits": dict(limits)},
        [{"name": "metrics", "containerPort": METRICS_PORT}],
    )
    return {
        "groupName": model.name,
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {"num-gpus": str(res.gpus)},
        "template": _pod_template(target, container, image, res.gpus, res.gpu_type),
    }


def ray_service(target: Target, defaults: RenderDefaults, graph: GraphConfig) -> dict[str, Any]:
    """The RayService: head (router, encoder) plus one GPU worker group per model."""
    spec = target.spec
    image = spec.images.worker or defaults.worker_image
    head_resources = {"cpu": HEAD_CPU, "memory": HEAD_MEMORY}
    head_container = _ray_container(
        target,
        "ray-head",
        image,
        {"requests": dict(head_resources), "limits": dict(head_resources)},
        [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": "serve", "containerPort": SERVE_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(target, target.name, "ray"),
        "spec": {
            "upgradeStrategy": {
                "type": "NewCluster" if spec.rollout.strategy == "NewCluster" else "None"
            },
            "serveConfigV2": yaml.safe_dump(serve_config(target, graph), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "idleTimeoutSeconds": 60,
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                    },
                    "securityContext": _restricted_container(),
                },
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": _pod_template(target, head_container, image, 0, None),
                },
                "workerGroupSpecs": [_worker_group(target, m, image) for m in spec.models],
            },
        },
    }


def graph_service(target: Target) -> dict[str, Any]:
    """A stable Service for the graph's OpenAI-compatible HTTP ingress (Serve proxies)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(target, target.name, "serve"),
        "spec": {
            "type": "ClusterIP",
            "selector": {DEPLOYMENT_LABEL: target.name, "ray.io/serve": "true"},
            "ports": [
                {"name": "http", "port": SERVE_PORT, "targetPort": SERVE_PORT, "protocol": "TCP"}
            ],
        },
    }


def http_endpoint(name: str, namespace: str) -> str:
    """The graph's in-cluster base URL."""
    return f"http://{name}.{namespace}.svc:{SERVE_PORT}"


# --- autoscaling and monitoring ---------------------------------------------------------


def scaled_object(target: Target, defaults: RenderDefaults) -> dict[str, Any]:
    """KEDA scales spec.replicas (the scale subresource) from DCGM and vLLM signals."""
    auto = target.spec.autoscaling
    wanted = [
        (queries.gpu_utilization, auto.targets.gpu_utilization),
        (queries.queue_depth, auto.targets.queue_depth),
        (queries.kv_cache_usage, auto.targets.kv_cache_usage),
    ]
    triggers = []
    for make, threshold in wanted:
        if threshold is None:
            continue
        query = make(target.namespace, target.name)
        metadata = {
            "serverAddress": defaults.prometheus_url,
            "query": query.query,
            "threshold": str(threshold),
        }
        if query.name == "queue-depth":
            # From zero replicas, one waiting request is enough to start one.
            metadata["activationThreshold"] = "0"
        triggers.append(
            {
                "type": "prometheus",
                "name": query.name,
                "metricType": query.metric_type,
                "metadata": metadata,
            }
        )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(target, target.name, "autoscaler"),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": target.name},
            "minReplicaCount": 0 if auto.scale_to_zero else auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "pollingInterval": auto.polling_interval_seconds,
            "cooldownPeriod": auto.cooldown_seconds,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleUp": {
                            "stabilizationWindowSeconds": auto.scale_up_stabilization_seconds,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                        },
                        "scaleDown": {
                            "stabilizationWindowSeconds": auto.scale_down_stabilization_seconds,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                        },
                    }
                }
            },
            "triggers": triggers,
        },
    }


def pod_monitor(target: Target) -> dict[str, Any]:
    """Prometheus scrapes Ray and vLLM metrics of the deployment's pods."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(target, target.name, "monitoring"),
        "spec": {
            "selector": {"matchLabels": {DEPLOYMENT_LABEL: target.name}},
            "podMetricsEndpoints": [
                {
                    "port": "metrics",
                    "path": "/metrics",
                    "interval": "15s",
                    "relabelings": [
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_llmops_dev_deployment"],
                            "targetLabel": "llmops_deployment",
                        },
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_group"],
                            "targetLabel": "ray_group",
                        },
                    ],
                }
            ],
        },
    }

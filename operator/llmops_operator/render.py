"""Pure renderers: an `LLMDeployment` manifest in, the Kubernetes objects it needs out.

`render` is the one code path behind both the operator and `llmops render`. It decides
nothing at serving time: the RayService's serveConfigV2 carries the services graph config
(`llmops_contract.GraphConfig`, validated here), so the cluster runs the graph
`llmops up` runs locally.

Each model scales on its own: its `LLMModel` (named `<deployment>-<model>`) is the scale
target KEDA and `kubectl scale` write, and its count reaches that model's Serve deployment and
worker group only. Replica counts live in the serveConfigV2 ``deployments`` overrides, never in
the application ``args`` nor the Ray cluster config: a changed count is then a lightweight
Serve update of that deployment alone. Ray Serve compares the new config's code version
(import_path, args, runtime_env: serve/_private/application_state.py `apply_app_config`,
`get_app_code_version`) and, when it is unchanged, only applies the deployment overrides
(`override_deployment_info`) without rebuilding the application; a deployment whose
autoscaling_config alone changed keeps its replicas' version (serve/_private/version.py
`DeploymentVersion.requires_actor_restart` leaves the autoscaling config out), so Serve adds or
removes replicas of that deployment and leaves the others as they are. KubeRay applies the new
serveConfigV2 to the running cluster in place.

LLM replica counts are always written as an ``autoscaling_config`` (min = max = the count):
Ray refuses ``num_replicas: 0`` (ray/serve/schema.py types it as a positive int), reaches zero
only through ``min_replicas: 0``, and restarts the application when a deployment switches
between ``num_replicas`` and ``autoscaling_config``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from llmops_contract import (
    API_VERSION,
    APP_NAME,
    ENCODER_DEPLOYMENT,
    GRAPH_IMPORT_PATH,
    KIND,
    MODEL_KIND,
    ROUTER_DEPLOYMENT,
    GraphConfig,
)
from llmops_contract.graph import llm_user_config, router_user_config, serve_args
from llmops_contract.tracing import tracing_env
from llmops_operator import queries
from llmops_operator.models import (
    MAX_NAME_LENGTH,
    MODEL_OBJECT_MAX_LENGTH,
    NAME_PATTERN,
    LLMDeploymentSpec,
    ModelSpec,
    model_scaling,
    parse_spec,
)
from llmops_operator.settings import DEFAULT_WORKER_IMAGE, OperatorSettings

DEPLOYMENT_LABEL = "llmops.dev/deployment"
MODEL_LABEL = "llmops.dev/model"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = "llmops-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
CACHE_MOUNT = "/models"
SOURCES_MOUNT = "/mnt/llmops-sources"
"""Where pvc:// sources' claims are mounted (read-only) in Ray pods: /mnt/llmops-sources/<claim>."""
PVC_SOURCE = re.compile(r"pvc://(?P<claim>[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?)(?P<path>/.*)?")
LOADER_CONTAINER = "loader"
FETCH_CONTAINER = "fetch-models"
TERMINATION_LOG = "/dev/termination-log"
"""The loader's report goes to its termination message (at most 4096 bytes, which
`llmops fetch --report` keeps to), where the operator reads the commits sources resolved to."""
READY_MARKER_DIR = ".llmops"
SERVE_PORT = 8000
METRICS_PORT = 8080
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365
RAY_VERSION = "2.60.0"
RUN_AS_USER = 1000
HEAD_CPU = "4"
HEAD_MEMORY = "16Gi"
# Labels KubeRay sets on every pod of a RayCluster (ray-operator/controllers/ray/utils/constant.go).
RAY_CLUSTER_LABEL = "ray.io/cluster"
RAY_NODE_TYPE_LABEL = "ray.io/node-type"
RAY_GROUP_LABEL = "ray.io/group"
CLUSTER_HASH_ANNOTATION = "llmops.dev/cluster-hash"
# libyaml's emitter where PyYAML has it: the same text, about ten times faster than the
# pure-Python one, which was a tenth of a reconcile pass.
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class RenderError(ValueError):
    """The manifest cannot be rendered; the message says what to fix.

    Attributes:
        reason: The Ready condition's reason the operator reports it with.
    """

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NetworkAccess:
    """Who may reach a graph's pods; see `network_policy`."""

    gateway_namespace: str = "llmops-system"
    gateway_pod_labels: tuple[tuple[str, str], ...] = (
        ("app.kubernetes.io/name", "llmops"),
        ("app.kubernetes.io/component", "gateway"),
    )
    monitoring_namespace_labels: tuple[tuple[str, str], ...] = (
        ("kubernetes.io/metadata.name", "monitoring"),
    )
    kuberay_pod_labels: tuple[tuple[str, str], ...] = (
        ("app.kubernetes.io/name", "kuberay-operator"),
    )


@dataclass(frozen=True)
class RenderDefaults:
    """Operator-wide values a manifest may leave out."""

    worker_image: str = DEFAULT_WORKER_IMAGE
    loader_image: str = DEFAULT_WORKER_IMAGE
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    network: NetworkAccess | None = NetworkAccess()
    tracing: tuple[tuple[str, str], ...] = ()
    """Environment of every Ray container that turns the graph's tracing on (empty: off)."""

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> RenderDefaults:
        """The defaults an operator with these settings renders with."""
        network = None
        if settings.network_policy:
            network = NetworkAccess(
                settings.graph_gateway_namespace(),
                tuple(settings.gateway_pod_labels.items()),
                tuple(settings.monitoring_namespace_labels.items()),
                tuple(settings.kuberay_pod_labels.items()),
            )
        tracing: tuple[tuple[str, str], ...] = ()
        if settings.otlp_traces_endpoint:
            env = tracing_env(settings.otlp_traces_endpoint, settings.trace_sample)
            tracing = tuple(sorted(env.items()))
        return cls(
            settings.worker_image,
            settings.loader_image,
            settings.prometheus_url,
            network,
            tracing,
        )


@dataclass(frozen=True)
class Observed:
    """What the cluster holds that changes what is rendered (read by the operator each pass).

    Attributes:
        active_cluster: The RayCluster serving now (RayService status
            activeServiceStatus.rayClusterName); the graph Service selects only its pods.
        secret_version: resourceVersion of spec.cache.credentialsSecret; a new version names
            a new loader Job, so a fixed token reaches a failed download.
    """

    active_cluster: str | None = None
    secret_version: str | None = None
    model_replicas: Mapping[str, int] = field(default_factory=dict)
    """Each model's replica count by model name: its LLMModel's spec.replicas (what KEDA or
    `kubectl scale` set). A model without one starts at its spec's count."""


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
    if len(name) > MAX_NAME_LENGTH or not re.match(NAME_PATTERN, name):
        raise RenderError(
            f"metadata.name {name!r} cannot name a RayService: use at most {MAX_NAME_LENGTH} "
            "lower-case letters, digits and '-', starting with a letter and ending with a "
            "letter or digit (KubeRay's limit)"
        )
    try:
        spec = parse_spec(dict(manifest.get("spec") or {}))
    except ValidationError as exc:
        raise RenderError(_explain(exc)) from exc
    for model in spec.models:
        object_name = model_object_name(name, model.name)
        if len(object_name) > MODEL_OBJECT_MAX_LENGTH:
            raise RenderError(
                f"model {model.name!r}: its scale target {MODEL_KIND} {object_name!r} would "
                f"have {len(object_name)} characters, over {MODEL_OBJECT_MAX_LENGTH} (it names "
                "the model's ScaledObject, which KEDA puts in a label of its HPA): shorten "
                "metadata.name or the model name",
                reason="NameTooLong",
            )
    return Target(name, meta.get("namespace") or "default", meta.get("uid"), spec)


def model_object_name(deployment: str, model: str) -> str:
    """The name of a model's LLMModel and ScaledObject: ``<deployment>-<model>``."""
    return f"{deployment}-{model}"


def model_replicas(target: Target, observed: Observed | None = None) -> dict[str, int]:
    """Each model's replica count: its LLMModel's when observed, else its spec's."""
    seen = (observed or Observed()).model_replicas
    return {
        m.name: seen.get(m.name, model_scaling(target.spec, m).replicas) for m in target.spec.models
    }


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
        PVC, loader Job, an LLMModel per model, RayService, Service, NetworkPolicy, then a
        ScaledObject per model (when autoscaling is on) and PodMonitor. With metadata.uid
        set, each carries an owner reference to the manifest.

    Raises:
        RenderError: the manifest is invalid; nothing should be applied.
    """
    target = parse_manifest(manifest)
    return render_target(target, defaults or RenderDefaults(), graph_config(target))


def render_target(
    target: Target, defaults: RenderDefaults, graph: GraphConfig, observed: Observed | None = None
) -> list[dict[str, Any]]:
    """`render` for an already parsed target, its validated graph config and cluster state."""
    observed = observed or Observed()
    children = []
    if shared_cache(target.spec):
        children += [cache_claim(target), cache_loader(target, defaults, observed)]
    counts = model_replicas(target, observed)
    children += [llm_model(target, m, counts[m.name]) for m in target.spec.models]
    children += [ray_service(target, defaults, graph, counts), graph_service(target, observed)]
    if defaults.network is not None:
        children.append(network_policy(target, defaults.network))
    if target.spec.autoscaling.enabled:
        children += [scaled_object(target, defaults, m) for m in target.spec.models]
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


def worker_selector(name: str, model: str) -> str:
    """Label selector of one model's Ray worker pods (the LLMModel's status.selector, the
    scale's selector).

    The HPA multiplies a Value metric's ratio by the ready pods this selector matches
    (pkg/controller/podautoscaler/replica_calculator.go): it must match one model's replica
    pods only, never the head, another model's workers or loader pods.
    """
    return f"{DEPLOYMENT_LABEL}={name},{RAY_NODE_TYPE_LABEL}=worker,{RAY_GROUP_LABEL}={model}"


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
            "source": served_source(model.source),
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
            # The replica resolves hf:// adapters through the model cache, as models.
            "adapters": [
                {"name": adapter.name, "source": served_source(adapter.source)}
                for adapter in model.adapters
            ],
            "lora": model.lora,
        }
        for model in spec.models
    ]
    encoder = spec.encoder
    config = {
        "llms": llms,
        "encoder": {
            "name": encoder.name,
            "source": served_source(encoder.source),
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


def serve_config(
    target: Target, graph: GraphConfig, counts: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2): one application built by `build_app`, each LLM
    deployment at its model's replica count (``counts``, by model name), a model's LoRA
    adapters as the user_config of its deployment and of the router: adding or removing one
    leaves the ``args`` as they are, and Serve reconfigures the running replicas in place
    (`llmops_contract.graph.serve_args`)."""
    spec = target.spec
    counts = counts if counts is not None else model_replicas(target)
    drain = spec.rollout.drain_seconds
    deployments: list[dict[str, Any]] = []
    for llm in graph.llms:
        entry: dict[str, Any] = {
            "name": llm.deployment_name,
            "autoscaling_config": serve_replicas(counts[llm.name]),
            "graceful_shutdown_timeout_s": drain,
        }
        adapters = llm_user_config(llm)
        if adapters is not None:
            entry["user_config"] = adapters
        deployments.append(entry)
    router: dict[str, Any] = {"name": ROUTER_DEPLOYMENT, "num_replicas": spec.router.replicas}
    adapter_table = router_user_config(graph)
    if adapter_table is not None:
        router["user_config"] = adapter_table
    deployments.append(router)
    if spec.encoder.enabled:
        deployments.append({"name": ENCODER_DEPLOYMENT, "num_replicas": spec.encoder.replicas})
    return {
        "applications": [
            {
                "name": APP_NAME,
                "import_path": GRAPH_IMPORT_PATH,
                "route_prefix": "/",
                "args": serve_args(graph),
                "deployments": deployments,
            }
        ]
    }


def serve_replicas(replicas: int) -> dict[str, Any]:
    """A fixed replica count as Serve accepts it, zero included.

    Serve validates max_replicas >= 1, so zero is min 0 / max 1 starting at 0 and released
    at once: KEDA (through the model's LLMModel) decides when a model runs, Serve's own
    autoscaler does not.
    """
    if replicas == 0:
        return {
            "min_replicas": 0,
            "max_replicas": 1,
            "initial_replicas": 0,
            "downscale_to_zero_delay_s": 0.0,
        }
    return {"min_replicas": replicas, "max_replicas": replicas, "initial_replicas": replicas}


# --- model cache ------------------------------------------------------------------------


def shared_cache(spec: LLMDeploymentSpec) -> bool:
    """One cache volume for every pod (ReadWriteMany), or one volume per Ray pod.

    With nothing to fetch (every source pvc://) there is no loader to share.
    """
    return spec.cache.access_mode == "ReadWriteMany" and bool(sources(spec))


def cache_claim_name(name: str) -> str:
    """The model cache PVC's name."""
    return f"{name}-model-cache"


def model_sources(model: ModelSpec) -> list[str]:
    """A model's source and its adapters' sources."""
    return [model.source, *(adapter.source for adapter in model.adapters)]


def all_sources(spec: LLMDeploymentSpec) -> list[str]:
    """Every model and adapter source of the graph, in a stable order."""
    found = [source for model in spec.models for source in model_sources(model)]
    if spec.encoder.enabled:
        found.append(spec.encoder.source)
    return sorted(set(found))


def sources(spec: LLMDeploymentSpec) -> list[str]:
    """The sources the model cache must hold: all but pvc:// ones, which are mounted, and
    adapter folders in the image, which are read in place."""
    models = {model.source for model in spec.models}
    if spec.encoder.enabled:
        models.add(spec.encoder.source)
    return [
        s
        for s in all_sources(spec)
        if not s.startswith("pvc://") and (s in models or s.startswith(("hf://", "s3://")))
    ]


def adapter_sources(spec: LLMDeploymentSpec) -> set[str]:
    """Sources that only adapters use: `llmops fetch` checks them for adapter_config.json
    (``--adapter``) where it checks a model's folder for config.json."""
    models = {model.source for model in spec.models} | {spec.encoder.source}
    return {a.source for m in spec.models for a in m.adapters} - models


def source_claim(source: str) -> tuple[str, str] | None:
    """``(claim, path inside it)`` of a ``pvc://<claim>[/<path>]`` source; None otherwise.

    Raises:
        RenderError: a pvc:// source that is not a claim name and a clean path.
    """
    if not source.startswith("pvc://"):
        return None
    match = PVC_SOURCE.fullmatch(source)
    parts = (match.group("path") or "").strip("/").split("/") if match else []
    if match is None or any(part in {".", ".."} for part in parts):
        raise RenderError(
            f"model source {source!r}: use pvc://<claim>[/<folder>], a PersistentVolumeClaim "
            "name in the LLMDeployment's namespace and a folder in it without '.' or '..'"
        )
    return match.group("claim"), "/".join(p for p in parts if p)


def served_source(source: str) -> str:
    """The source as the graph loads it: a pvc:// source becomes its folder in the mount."""
    found = source_claim(source)
    if found is None:
        return source
    claim, path = found
    return "/".join(p for p in (SOURCES_MOUNT, claim, path) if p)


def source_claims(spec: LLMDeploymentSpec) -> list[str]:
    """The PersistentVolumeClaims pvc:// sources name, in a stable order."""
    return sorted({found[0] for s in all_sources(spec) if (found := source_claim(s))})


def _claim_volume(claim: str) -> str:
    return f"source-{hashlib.sha256(claim.encode()).hexdigest()[:10]}"


def cache_key(spec: LLMDeploymentSpec) -> str:
    """Short hash of the cache contents; names the loader Job and its ready marker."""
    return hashlib.sha256(json.dumps(sources(spec)).encode()).hexdigest()[:10]


def loader_job_name(target: Target, observed: Observed | None = None) -> str:
    """The loader Job's name (at most 63 characters, as Job names must be).

    New sources or a new version of the credentials Secret get a new Job: a Job's pod template
    is immutable, and a Job that failed on a missing token must not be the last word.
    """
    secret = (observed or Observed()).secret_version or ""
    key = json.dumps([sources(target.spec), target.spec.cache.credentials_secret, secret])
    return f"{target.name}-load-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


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


def _fetch_container(
    target: Target, name: str, image: str, wanted: list[str], marker: str | None
) -> dict[str, Any]:
    """`llmops fetch` of some sources into the cache mount, with the credentials Secret."""
    command = ["llmops", "fetch", "--cache-dir", CACHE_MOUNT, "--report", TERMINATION_LOG]
    if marker:
        command += ["--marker", marker]
    adapters = adapter_sources(target.spec)
    for source in wanted:
        command += ["--adapter", source] if source in adapters else [source]
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "command": command,
        # The report on success; the end of the log (the error) on failure.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": [{"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"}],
        "resources": {
            "requests": {"cpu": "1", "memory": "4Gi"},
            "limits": {"cpu": "4", "memory": "16Gi"},
        },
        "securityContext": _restricted_container(),
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_MOUNT}],
    }
    secret = target.spec.cache.credentials_secret
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    return container


def cache_loader(
    target: Target, defaults: RenderDefaults, observed: Observed | None = None
) -> dict[str, Any]:
    """A Job that downloads every source into the shared cache once, then writes the marker."""
    spec = target.spec
    image = spec.images.loader or defaults.loader_image
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "securityContext": _pod_security(),
        "containers": [
            _fetch_container(target, LOADER_CONTAINER, image, sources(spec), ready_marker(spec))
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
        "metadata": _meta(target, loader_job_name(target, observed), "model-loader"),
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
            {"name": "LLMOPS_OFFLINE", "value": "1"},
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
            *(
                {"name": _claim_volume(c), "mountPath": f"{SOURCES_MOUNT}/{c}", "readOnly": True}
                for c in source_claims(target.spec)
            ),
        ],
    }


def _pod_volumes(target: Target) -> list[dict[str, Any]]:
    cache = target.spec.cache
    if shared_cache(target.spec):
        volume: dict[str, Any] = {
            "persistentVolumeClaim": {"claimName": cache_claim_name(target.name), "readOnly": True}
        }
    else:
        # A generic ephemeral volume: a ReadWriteOnce PVC per pod, deleted with the pod.
        claim: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": cache.size}},
        }
        if cache.storage_class_name:
            claim["storageClassName"] = cache.storage_class_name
        volume = {
            "ephemeral": {
                "volumeClaimTemplate": {
                    "metadata": {"labels": labels(target, "model-cache")},
                    "spec": claim,
                }
            }
        }
    return [
        {"name": "model-cache", **volume},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        *(
            {
                "name": _claim_volume(claim),
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
            for claim in source_claims(target.spec)
        ),
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
    target: Target,
    container: dict[str, Any],
    images: tuple[str, str],
    gpus: int,
    gpu_type: str | None,
) -> dict[str, Any]:
    """A Ray pod: waits for the shared cache, or fills its own volume first.

    With a volume per pod, any pod may run any replica whose resources it offers (Ray places
    by resources, not by worker group), so a worker fetches every source; the head, which
    offers no GPU, skips the GPU models'.
    """
    image, loader_image = images
    spec = target.spec
    init: list[dict[str, Any]] = []
    if shared_cache(spec):
        init.append(_wait_for_cache(target, image))
    else:
        gpu_models = [m for m in spec.models if m.resources.gpus] if gpus == 0 else []
        skip = {s for m in gpu_models for s in model_sources(m)}
        wanted = [s for s in sources(spec) if s not in skip]
        if wanted:
            init.append(_fetch_container(target, FETCH_CONTAINER, loader_image, wanted, None))
    pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": spec.rollout.drain_seconds + 30,
        "initContainers": init,
        "containers": [container],
        "volumes": _pod_volumes(target),
    }
    _place(pod, target.spec, gpus, gpu_type)
    return {"metadata": {"labels": labels(target, "ray")}, "spec": pod}


def _worker_group(
    target: Target, model: ModelSpec, images: tuple[str, str], count: int
) -> dict[str, Any]:
    """One model's worker group, at its replica count, within its bounds (each worker pod
    holds one replica). At 0 no worker of it is kept: Ray's autoscaler removes idle ones."""
    spec = target.spec
    res = model.resources
    limits: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        limits["nvidia.com/gpu"] = res.gpus
    if spec.autoscaling.enabled:
        scaling = model_scaling(spec, model)
        low, high = scaling.min_replicas, scaling.max_replicas
    else:
        # Without KEDA, replicas are set by hand; room to grow without a new Ray cluster.
        low, high = 0, max(count, 1) * 4
    container = _ray_container(
        target,
        "ray-worker",
        images[0],
        {"requests": dict(limits), "limits": dict(limits)},
        [{"name": "metrics", "containerPort": METRICS_PORT}],
    )
    return {
        "groupName": model.name,
        "replicas": count,
        "minReplicas": min(low, count),
        "maxReplicas": max(high, count),
        "rayStartParams": {"num-gpus": str(res.gpus)},
        "template": _pod_template(target, container, images, res.gpus, res.gpu_type),
    }


def ray_service(
    target: Target,
    defaults: RenderDefaults,
    graph: GraphConfig,
    counts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The RayService: head (router, encoder) plus one GPU worker group per model."""
    spec = target.spec
    counts = counts if counts is not None else model_replicas(target)
    image = spec.images.worker or defaults.worker_image
    images = (image, spec.images.loader or defaults.loader_image)
    head_resources = {"cpu": HEAD_CPU, "memory": HEAD_MEMORY}
    head_container = _ray_container(
        target,
        "ray-head",
        image,
        {"requests": dict(head_resources), "limits": dict(head_resources)},
        [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": 10001},
            {"name": "serve", "containerPort": SERVE_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
    )
    cluster: dict[str, Any] = {
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
            "template": _pod_template(target, head_container, images, 0, None),
        },
        "workerGroupSpecs": [_worker_group(target, m, images, counts[m.name]) for m in spec.models],
    }
    # Tracing reaches every Ray process (Ray Serve reads it in each replica): a changed
    # endpoint is a pod change, rolled out like any other.
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        ray = group["template"]["spec"]["containers"][0]
        ray["env"] += [{"name": k, "value": v} for k, v in defaults.tracing]
    head_meta = cluster["headGroupSpec"]["template"]["metadata"]
    head_meta["annotations"] = {CLUSTER_HASH_ANNOTATION: cluster_hash(cluster)}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(target, target.name, "ray"),
        "spec": {
            # KubeRay's "None" creates no new cluster; Recreate is the operator deleting the
            # active one when its cluster hash annotation is stale (KubeRay then makes a new one).
            "upgradeStrategy": {
                "type": "NewCluster" if spec.rollout.strategy == "NewCluster" else "None"
            },
            "serveConfigV2": yaml.dump(
                serve_config(target, graph, counts), Dumper=_DUMPER, sort_keys=False
            ),
            "rayClusterConfig": cluster,
        },
    }


def cluster_hash(cluster: Mapping[str, Any]) -> str:
    """Hash of a Ray cluster config without the replica bounds of its worker groups.

    Stamped on the head pod template, it is part of what KubeRay hashes to decide whether a
    RayService needs a new cluster, so every change the renderer makes to pods (tolerations
    included, which KubeRay >= 1.6 leaves out) rolls out; bounds are applied to the running
    cluster instead (KubeRay leaves them out of its hash too). With rollout Recreate the
    operator compares it with the active RayCluster's.
    """
    trimmed = json.loads(json.dumps(cluster))
    trimmed["headGroupSpec"]["template"]["metadata"].pop("annotations", None)
    for group in trimmed.get("workerGroupSpecs", []):
        for key in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(key, None)
    digest = hashlib.sha256(json.dumps(trimmed, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def graph_service(target: Target, observed: Observed | None = None) -> dict[str, Any]:
    """A stable Service for the graph's OpenAI-compatible HTTP ingress (Serve proxies).

    KubeRay labels ``ray.io/serve=true`` on the pods of a pending cluster too (its models may
    still load), so once a cluster is active the Service selects only that cluster's pods;
    before the first one is active there is no other cluster to exclude.
    """
    selector = {DEPLOYMENT_LABEL: target.name, "ray.io/serve": "true"}
    active = (observed or Observed()).active_cluster
    if active:
        selector[RAY_CLUSTER_LABEL] = active
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(target, target.name, "serve"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": SERVE_PORT, "targetPort": SERVE_PORT, "protocol": "TCP"}
            ],
        },
    }


def network_policy(target: Target, access: NetworkAccess) -> dict[str, Any]:
    """Only the gateway reaches the graph: its pods' keys and limits cannot be walked around.

    Ingress to every pod of the deployment: from its own pods (Ray's GCS, raylets, object
    transfers and Serve use many ports), from the gateway pods on the serve port, from the
    monitoring namespaces on the metrics port, and from the KubeRay operator on the
    dashboard (KubeRay submits serveConfigV2 with PUT /api/serve/applications/ on 8265; the
    dashboard agent's 52365 served it before Ray 2.9). Egress stays open: loaders download.
    """
    own = {"podSelector": {"matchLabels": {DEPLOYMENT_LABEL: target.name}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(target, target.name, "network-policy"),
        "spec": {
            "podSelector": {"matchLabels": {DEPLOYMENT_LABEL: target.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": access.gateway_namespace
                                }
                            },
                            "podSelector": {"matchLabels": dict(access.gateway_pod_labels)},
                        }
                    ],
                    "ports": [{"port": SERVE_PORT, "protocol": "TCP"}],
                },
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": dict(access.monitoring_namespace_labels)
                            }
                        }
                    ],
                    "ports": [{"port": METRICS_PORT, "protocol": "TCP"}],
                },
                {
                    "from": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": dict(access.kuberay_pod_labels)},
                        }
                    ],
                    "ports": [
                        {"port": DASHBOARD_PORT, "protocol": "TCP"},
                        {"port": DASHBOARD_AGENT_PORT, "protocol": "TCP"},
                    ],
                },
            ],
        },
    }


def http_endpoint(name: str, namespace: str) -> str:
    """The graph's in-cluster base URL."""
    return f"http://{name}.{namespace}.svc:{SERVE_PORT}"


# --- autoscaling and monitoring ---------------------------------------------------------


def llm_model(target: Target, model: ModelSpec, replicas: int) -> dict[str, Any]:
    """A model's scale target. The operator creates it with ``replicas`` and never applies
    spec.replicas again while autoscaling is on (KEDA's HPA and `kubectl scale` own it); see
    reconcile.sync_models."""
    meta = _meta(target, model_object_name(target.name, model.name), "model")
    meta["labels"][MODEL_LABEL] = model.name
    return {
        "apiVersion": API_VERSION,
        "kind": MODEL_KIND,
        "metadata": meta,
        "spec": {"deployment": target.name, "model": model.name, "replicas": replicas},
    }


def scaled_object(target: Target, defaults: RenderDefaults, model: ModelSpec) -> dict[str, Any]:
    """KEDA scales one model's LLMModel (its scale subresource) from that model's signals:
    DCGM over its worker pods, its vLLM queue and KV cache, Serve's queue in front of it and
    the requests the gateway holds for it (which wake it from zero)."""
    auto = target.spec.autoscaling
    scaling = model_scaling(target.spec, model)
    targets = scaling.targets
    ns, name = target.namespace, target.name
    wanted = [
        (queries.gpu_utilization(ns, name, model.name), targets.gpu_utilization),
        (queries.queue_depth(ns, name, model.name), targets.queue_depth),
        (queries.kv_cache_usage(ns, name, model.name), targets.kv_cache_usage),
        # A held request is waiting demand like a queued one, per replica.
        (queries.held_requests(model.name), targets.queue_depth or 1),
    ]
    triggers = []
    for query, threshold in wanted:
        if threshold is None:
            continue
        metadata = {
            "serverAddress": defaults.prometheus_url,
            "query": query.query,
            "threshold": str(threshold),
        }
        if query.name in {"queue-depth", "held-requests"}:
            # KEDA activates (0 -> 1) when the value is above activationThreshold
            # (pkg/scalers/prometheus_scaler.go, GetMetricsAndActivity: value >
            # activationThreshold): one waiting or held request starts a model at zero.
            metadata["activationThreshold"] = "0"
        triggers.append(
            {
                "type": "prometheus",
                "name": query.name,
                "metricType": query.metric_type,
                "metadata": metadata,
            }
        )
    object_name = model_object_name(name, model.name)
    meta = _meta(target, object_name, "autoscaler")
    meta["labels"][MODEL_LABEL] = model.name
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": MODEL_KIND, "name": object_name},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
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

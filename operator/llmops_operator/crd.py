"""Generates the `LLMDeployment` and `LLMModel` CustomResourceDefinitions from the pydantic
models.

Pydantic writes JSON Schema; the Kubernetes API wants a structural OpenAPI v3 schema: no
``$ref``, no ``anyOf`` with null (``nullable`` instead), no ``additionalProperties`` beside
``properties`` (a free-form object preserves unknown fields instead), boolean
``exclusiveMinimum``. `crd_manifest` does that translation, and adds
printer columns, the status and scale subresources and the short name.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from llmops_contract import GROUP, KIND, MODEL_KIND, MODEL_PLURAL, PLURAL, VERSION
from llmops_operator.models import (
    MAX_NAME_LENGTH,
    MODEL_SHORT_NAMES,
    MODEL_SINGULAR,
    NAME_PATTERN,
    SHORT_NAMES,
    SINGULAR,
    LLMDeploymentSpec,
    LLMDeploymentStatus,
    LLMModelSpec,
    LLMModelStatus,
)

CRD_FILE_NAME = f"{GROUP}_{PLURAL}.yaml"
MODEL_CRD_FILE_NAME = f"{GROUP}_{MODEL_PLURAL}.yaml"
_DROPPED_KEYS = {"title"}

# CEL rules (x-kubernetes-validations): the API server refuses at `kubectl apply` what would
# otherwise fail later, on the cluster, after other children exist. Each mirrors a check of the
# pydantic models or the graph config (llmops_contract), so the operator and the CRD agree.
NAME_RULES = [
    {
        # KubeRay refuses longer RayService names
        # (ray-operator/controllers/ray/utils/validation.go).
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters: it names the "
        "RayService, and KubeRay refuses longer names",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', "
        "starting with a letter): it names the RayService",
    },
]
SPEC_RULES = [
    {
        "rule": "!has(self.router) || !has(self.router.defaultModel) || "
        "self.models.exists(m, m.name == self.router.defaultModel)",
        "message": "router.defaultModel must name one of spec.models",
        "fieldPath": ".router.defaultModel",
    },
    {
        "rule": "!has(self.router) || !has(self.router.policy) || "
        "self.router.policy != 'semantic' || "
        "self.models.exists(m, has(m.routeExamples) && m.routeExamples.size() > 0)",
        "message": "router.policy 'semantic' needs routeExamples on some model",
        "fieldPath": ".router.policy",
    },
    {
        "rule": "!has(self.router) || !has(self.router.policy) || "
        "self.router.policy != 'semantic' || !has(self.encoder) || "
        "!has(self.encoder.enabled) || self.encoder.enabled",
        "message": "router.policy 'semantic' needs the encoder enabled",
        "fieldPath": ".encoder.enabled",
    },
]
AUTOSCALING_RULES = [
    {
        "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || "
        "self.maxReplicas >= self.minReplicas",
        "message": "autoscaling.maxReplicas must be at least minReplicas",
    }
]
_TP = (
    "(has(self.engine) && has(self.engine.tensor_parallel_size) ? "
    "self.engine.tensor_parallel_size : 1)"
)
_GPUS = "(has(self.resources) && has(self.resources.gpus) ? self.resources.gpus : 1)"
MODEL_RULES = [
    {
        "rule": f"{_GPUS} == 0 ? {_TP} == 1 : {_GPUS} == {_TP}",
        "message": "resources.gpus must equal engine.tensor_parallel_size (one replica's GPUs "
        "shard the model); tensor_parallel_size > 1 needs GPUs",
    }
]


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """One JSON Schema node as a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        target = _structural(defs[ref.rsplit("/", 1)[-1]], defs)
        node = {**target, **node}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        options = [option for option in any_of if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {any_of!r} structurally")
        merged = _structural(options[0], defs)
        node = {**merged, **node}
        if len(options) < len(any_of):
            node["nullable"] = True
            if node.get("default", ...) is None:
                del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in {"items", "additionalProperties"} and isinstance(value, dict):
            out[key] = _structural(value, defs)
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = value
    if "properties" in out:
        out["type"] = "object"
        out.pop("additionalProperties", None)
    elif out.get("additionalProperties") is True:
        # A free-form object (dict[str, Any]): structural schemas keep its keys this way,
        # where the API server would otherwise prune them.
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's structural OpenAPI v3 schema (camelCase keys)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return dict(_structural(schema, defs))


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    spec_schema = openapi_schema(LLMDeploymentSpec)
    # Model names are keys: the API server itself rejects two models with one name.
    models = spec_schema["properties"]["models"]
    models["x-kubernetes-list-type"] = "map"
    models["x-kubernetes-list-map-keys"] = ["name"]
    models["items"]["x-kubernetes-validations"] = MODEL_RULES
    # Likewise two adapters of one model; names across models are the operator's check.
    adapters = models["items"]["properties"]["adapters"]
    adapters["x-kubernetes-list-type"] = "map"
    adapters["x-kubernetes-list-map-keys"] = ["name"]
    spec_schema["properties"]["autoscaling"]["x-kubernetes-validations"] = AUTOSCALING_RULES
    spec_schema["x-kubernetes-validations"] = SPEC_RULES
    status_schema = openapi_schema(LLMDeploymentStatus)
    # Lists keyed as metav1.Condition's are: server-side apply merges them by key.
    for listed, key in (("conditions", "type"), ("models", "name"), ("sources", "source")):
        status_schema["properties"][listed]["x-kubernetes-list-type"] = "map"
        status_schema["properties"][listed]["x-kubernetes-list-map-keys"] = [key]
    condition = status_schema["properties"]["conditions"]["items"]["properties"]
    condition["lastTransitionTime"]["format"] = "date-time"
    return _crd_frame(
        kind=KIND,
        plural=PLURAL,
        singular=SINGULAR,
        short_names=SHORT_NAMES,
        description="A model (or graph of models) served by Ray Serve and vLLM on KubeRay, "
        "autoscaled by KEDA.",
        spec=spec_schema,
        status=status_schema,
        validations=NAME_RULES,
        columns=[
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
            {
                "name": "Reason",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
            },
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
            {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Models", "type": "string", "jsonPath": ".status.modelsSummary"},
            {
                "name": "Model Replicas",
                "type": "string",
                "description": "Ready/desired replicas per model.",
                "jsonPath": ".status.replicasSummary",
                "priority": 1,
            },
        ],
    )


def model_crd_manifest() -> dict[str, Any]:
    """The LLMModel CustomResourceDefinition: one model's scale target.

    Its /scale subresource is what KEDA's HPA and `kubectl scale llmmodel` write; the label
    selector is that model's worker pods, which the HPA counts for Value metrics.
    """
    return _crd_frame(
        kind=MODEL_KIND,
        plural=MODEL_PLURAL,
        singular=MODEL_SINGULAR,
        short_names=MODEL_SHORT_NAMES,
        description="One model of an LLMDeployment as a scale target (created and owned by "
        "the operator).",
        spec=openapi_schema(LLMModelSpec),
        status=openapi_schema(LLMModelStatus),
        validations=None,
        columns=[
            {"name": "Deployment", "type": "string", "jsonPath": ".spec.deployment"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
            {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.replicas"},
        ],
    )


def _crd_frame(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    description: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    validations: list[dict[str, str]] | None,
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    """A namespaced CRD of the group with one stored version, status and /scale subresources
    (spec.replicas, status.replicas, status.selector) and an Age column after ``columns``."""
    root: dict[str, Any] = {"type": "object", "description": description, "required": ["spec"]}
    if validations is not None:
        root["x-kubernetes-validations"] = validations
    root["properties"] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": spec,
        "status": status,
    }
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": ["llmops"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [*columns, age],
                }
            ],
        },
    }


HEADER = "# Generated from llmops_operator.models by `llmops crd`; do not edit.\n"


def crd_yaml() -> str:
    """The LLMDeployment CRD as the YAML committed in the chart (stable key order)."""
    return HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


def model_crd_yaml() -> str:
    """The LLMModel CRD as the YAML committed in the chart."""
    return HEADER + yaml.safe_dump(model_crd_manifest(), sort_keys=False, width=100)


def crd_files() -> dict[str, str]:
    """Every CRD of the project: file name -> YAML (what `llmops crd --write` writes)."""
    return {CRD_FILE_NAME: crd_yaml(), MODEL_CRD_FILE_NAME: model_crd_yaml()}

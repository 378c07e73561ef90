"""Validates Kubernetes objects against official schemas, strictly.

Built-in kinds go through `kubernetes_validate` (the upstream OpenAPI schemas, strict: unknown
fields fail). Custom kinds go through their CRD's ``openAPIV3Schema``: the upstream CRDs in
tests/data/crds and the project's own generated CRD. OpenAPI v3 extensions are translated to
JSON Schema (``nullable``, ``x-kubernetes-int-or-string``), and objects without
``x-kubernetes-preserve-unknown-fields`` reject unknown keys, as ``kubectl --validate=strict``
does, so a typo in a rendered field fails instead of being pruned silently.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

from llmops_operator.crd import crd_manifest, model_crd_manifest

KUBERNETES_VERSION = "1.33"
CRD_DIR = Path(__file__).parent / "data" / "crds"
CUSTOM_GROUPS = ("ray.io", "keda.sh", "monitoring.coreos.com", "llmops.dev")


def _to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _to_json_schema(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _crd_validators(crd: dict[str, Any]) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    spec = crd["spec"]
    found = {}
    for version in spec["versions"]:
        schema = _to_json_schema(version["schema"]["openAPIV3Schema"])
        # apiVersion/kind/metadata are checked by the API server itself.
        schema.setdefault("properties", {})["metadata"] = {"type": "object"}
        key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
        found[key] = jsonschema.Draft7Validator(schema)
    return found


def _own_crds() -> list[dict[str, Any]]:
    """The project's own generated CRDs (LLMDeployment, LLMModel)."""
    return [crd_manifest(), model_crd_manifest()]


@functools.cache
def _own_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of each of the project's own kinds, whose
    CEL rules (x-kubernetes-validations) the API server evaluates."""
    schemas = {}
    for crd in _own_crds():
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


@functools.cache
def custom_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> validator, for every custom kind the project renders."""
    validators: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
    for crd in _own_crds():
        validators.update(_crd_validators(crd))
    for path in sorted(CRD_DIR.glob("*.yaml")):
        validators.update(_crd_validators(yaml.safe_load(path.read_text())))
    return validators


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one object, as readable lines (empty when valid)."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    where = f"{key[1]} {obj.get('metadata', {}).get('name')}"
    validator = custom_validators().get(key)
    if validator is not None:
        errors = [
            f"{where}: {'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
            for error in validator.iter_errors(obj)
        ]
        schema = _own_schemas().get(key)
        if errors or schema is None:
            return errors
        # The API server evaluates CEL rules only on objects that passed the schema, each
        # kind's own.
        return [f"{where}: {line}" for line in cel_errors(schema, obj)]
    if key[0].split("/")[0].endswith(CUSTOM_GROUPS):
        return [f"{where}: no schema for custom kind {key}"]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {exc}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: no schema: {exc}"]
    return []


def assert_valid(objs: Iterable[dict[str, Any]]) -> None:
    """Fails with every violation of every object."""
    errors = [line for obj in objs for line in schema_errors(obj)]
    assert not errors, "\n".join(errors)


@functools.cache
def _cel_program(rule: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def cel_errors(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Every failed ``x-kubernetes-validations`` rule of a CRD schema, as the API server
    evaluates them: each rule with ``self`` bound to the value at its schema node, depth
    first (k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel/validation.go).
    """
    found = []
    rules = schema.get("x-kubernetes-validations", [])
    if not rules:
        value = None
    elif not path and isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        # At the root, rules see metadata.name and metadata.generateName only (the rest of
        # metadata, managedFields included, is not part of the rule's `self`).
        meta = {k: v for k, v in obj["metadata"].items() if k in ("name", "generateName")}
        value = celpy.json_to_cel({**obj, "metadata": meta})
    else:
        value = celpy.json_to_cel(obj)
    for rule in rules:
        try:
            ok = _cel_program(rule["rule"]).evaluate({"self": value})
        except celpy.CELEvalError as exc:
            found.append(f"{path or '<root>'}: rule {rule['rule']!r} failed to evaluate: {exc}")
            continue
        if isinstance(ok, celpy.CELEvalError) or not ok:
            found.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in obj:
                found += cel_errors(sub, obj[key], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            found += cel_errors(schema["items"], item, f"{path}[{index}]")
    return found

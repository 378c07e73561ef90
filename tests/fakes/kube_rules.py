"""What a kube-apiserver refuses or rewrites on a write, and how its watch cache answers.

tests/fakes/kube_api.py stores objects; this module holds the rules it applies, each copied
from the upstream code named in its docstring, so a test against the fake fails where a real
cluster would refuse the same request:

- the scale subresource answers ``autoscaling/v1`` Scale objects built from the CRD's
  specReplicasPath / statusReplicasPath / labelSelectorPath;
- writes of LLMDeployments are pruned, defaulted and validated against the generated CRD
  (structural schema, then CEL rules): 422 ``Invalid`` with a cause per field;
- immutable fields of PersistentVolumeClaims and Jobs: 422 ``Invalid``;
- a write carrying a resourceVersion other than the stored one: 409 ``Conflict``;
- metadata.generation moves only when something other than metadata (and status, where a
  status subresource exists) changes; /status writes only status, the main resource never
  writes status;
- watches resume from a resourceVersion inside a bounded window, answer an ERROR event with
  a 410 ``Expired`` Status below it, and send BOOKMARK events when asked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import decimal
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from kmock._internal import aiobus, enums, k8s, rendering

from llmops_operator.crd import crd_manifest, model_crd_manifest
from tests.schemas import cel_errors, custom_validators

if TYPE_CHECKING:
    from tests.fakes.kube_api import KubeAPI

Cause = dict[str, str]


@attrs.frozen
class InvalidError(k8s.KubernetesError):
    """HTTP 422 ``Invalid``: k8s.io/apimachinery/pkg/api/errors NewInvalid."""

    status: int = 422
    reason: str = "Invalid"
    message: str = "the object is invalid"


@attrs.frozen
class StaleError(k8s.KubernetesError):
    """HTTP 409 ``Conflict``: k8s.io/apimachinery/pkg/api/errors NewConflict, as the
    registry answers an update whose resourceVersion precondition failed."""

    status: int = 409
    reason: str = "Conflict"
    message: str = "the object has been modified"


@attrs.frozen
class BadRequestError(k8s.KubernetesError):
    """HTTP 400 ``BadRequest`` (strict field validation, malformed parameters)."""

    status: int = 400
    reason: str = "BadRequest"
    message: str = "bad request"


# --- errors in the API server's words -------------------------------------------------------


def _group_kind(obj: Mapping[str, Any]) -> tuple[str, str]:
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return group, str(obj.get("kind", ""))


def invalid(obj: Mapping[str, Any], causes: list[Cause]) -> InvalidError:
    """A 422 as NewInvalid builds it: ``Kind.group "name" is invalid: field: body``."""
    group, kind = _group_kind(obj)
    name = str(obj.get("metadata", {}).get("name", ""))
    qualified = f"{kind}.{group}" if group else kind
    errors = [f"{c['field'] or '<nil>'}: {c['message']}" for c in causes]
    listed = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    return InvalidError(
        message=f'{qualified} "{name}" is invalid: {listed}',
        details={"name": name, "group": group, "kind": kind, "causes": causes},
    )


def stale(request: rendering.Request) -> StaleError:
    """A 409 as NewConflict builds it for a failed resourceVersion precondition."""
    resource = request.resource
    plural = resource.plural if resource else ""
    group = (resource.group or "") if resource else ""
    qualified = f"{plural}.{group}" if group else plural
    return StaleError(
        message=(
            f'Operation cannot be fulfilled on {qualified} "{request.name}": the object has been'
            " modified; please apply your changes to the latest version and try again"
        ),
        details={"name": request.name, "group": group, "kind": plural},
    )


def _value(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- merge patches --------------------------------------------------------------------------


def merged(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch of ``current`` (None removes a key)."""
    result = copy.deepcopy(dict(current))
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        elif isinstance(value, Mapping):
            result[key] = merged({}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_diff(current: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns ``current`` into ``new``."""
    patch: dict[str, Any] = {key: None for key in current if key not in new}
    for key, value in new.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and value:
            sub = merge_diff(old, value)
            if sub:
                patch[key] = sub
        elif key not in current or old != value or type(old) is not type(value):
            patch[key] = copy.deepcopy(value)
    return patch


def sent_version(data: Any) -> str | None:
    """The resourceVersion a write names as its precondition, if any."""
    if not isinstance(data, Mapping):
        return None
    version = (data.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


# --- generation, status and spec (apiextensions-apiserver pkg/registry/customresource) -------


def _without(obj: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in set(keys)}


def prepare_update(
    current: Mapping[str, Any],
    new: Mapping[str, Any],
    subresource: str | None,
    has_status: bool,
) -> dict[str, Any]:
    """The object an update stores, as the custom resource strategies prepare it.

    k8s.io/apiextensions-apiserver/pkg/registry/customresource/strategy.go: a main-resource
    write keeps the stored status when the status subresource exists; a /status write keeps
    everything but status (statusStrategy.PrepareForUpdate copies the old object and sets the
    new status only). metadata.generation moves by one when anything but metadata (and
    status, with the subresource) changed; never otherwise (rest.BeforeUpdate resets it).
    """
    result = copy.deepcopy(dict(new))
    meta = result.setdefault("metadata", {})
    if subresource == "status":
        status = result.get("status", _MISSING)
        managed = meta.get("managedFields")
        version = meta.get("resourceVersion")
        result = copy.deepcopy(dict(current))
        meta = result.setdefault("metadata", {})
        if status is _MISSING:
            result.pop("status", None)
        else:
            result["status"] = status
        for key, value in (("managedFields", managed), ("resourceVersion", version)):
            if value is not None:
                meta[key] = value
    elif has_status:
        if "status" in current:
            result["status"] = copy.deepcopy(current["status"])
        else:
            result.pop("status", None)
    ignored = ("metadata", "status") if has_status else ("metadata",)
    generation = int(current.get("metadata", {}).get("generation") or 1)
    if _without(result, ignored) != _without(current, ignored):
        generation += 1
    meta["generation"] = generation
    return result


_MISSING: Any = object()


# --- structural schema: pruning, defaulting, validation (apiextensions-apiserver) ----------


@functools.cache
def _llmd_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@functools.cache
def _schemas() -> dict[str, dict[str, Any]]:
    """The project's own kinds -> their CRD's structural schema."""
    found = {}
    for crd in (crd_manifest(), model_crd_manifest()):
        kind = crd["spec"]["names"]["kind"]
        found[kind] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return found


def prune(value: Any, schema: Mapping[str, Any], path: str = "", root: bool = False) -> list[str]:
    """Drops fields the schema does not declare; returns their paths.

    k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning/algorithm.go: unknown keys
    go unless ``x-kubernetes-preserve-unknown-fields``; apiVersion, kind and metadata stay at
    the root (and in embedded resources).
    """
    dropped: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep_all = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or extra is True
        embedded = root or bool(schema.get("x-kubernetes-embedded-resource"))
        for key in list(value):
            where = f"{path}.{key}" if path else key
            if embedded and key in ("apiVersion", "kind", "metadata"):
                continue  # ObjectMeta is the API server's own (pruned to its fields there)
            if key in properties:
                dropped += prune(value[key], properties[key], where)
            elif isinstance(extra, Mapping):
                dropped += prune(value[key], extra, where)
            elif keep_all:
                continue
            else:
                del value[key]
                dropped.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            dropped += prune(item, schema["items"], f"{path}[{index}]")
    return dropped


def default(value: Any, schema: Mapping[str, Any]) -> None:
    """Fills in schema defaults, as
    k8s.io/apiextensions-apiserver/pkg/apiserver/schema/defaulting/algorithm.go does: an
    absent property with a default (or a null one that is not nullable) gets a copy of it."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, prop in properties.items():
            if "default" not in prop:
                continue
            if key not in value or (value[key] is None and not prop.get("nullable")):
                value[key] = copy.deepcopy(prop["default"])
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                default(item, properties[key])
            elif isinstance(extra, Mapping):
                default(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            default(item, schema["items"])


def _field(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def cel_lines(schema: Mapping[str, Any], new: Any, old: Any = None, path: str = "") -> list[str]:
    """tests.schemas.cel_errors, with the API server's validation ratcheting
    (CRDValidationRatcheting, on by default since 1.30): rules under a value the update left
    unchanged are not evaluated again. ``old`` None is a create."""
    if old is not None and new == old:
        return []
    rules = schema.get("x-kubernetes-validations")
    found = cel_errors({"x-kubernetes-validations": rules}, new, path) if rules else []
    if isinstance(new, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in new:
                before = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
                found += cel_lines(sub, new[key], None if before is _MISSING else before,
                                   f"{path}.{key}")  # fmt: skip
    elif isinstance(new, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(new):  # atomic lists: items are not correlated
            found += cel_lines(schema["items"], item, None, f"{path}[{index}]")
    return found


def schema_causes(
    obj: Mapping[str, Any], cel_rules: bool = True, old: Mapping[str, Any] | None = None
) -> list[Cause]:
    """The structural schema's and then the CEL rules' errors, as causes.

    The schema check is k8s.io/apiextensions-apiserver/pkg/apiserver/validation; CEL rules
    (``x-kubernetes-validations``) run only on an object that passed it
    (pkg/apiserver/schema/cel/validation.go), each reported as ``Invalid value: "object"``.
    """
    validator = custom_validators()[(str(obj.get("apiVersion")), str(obj.get("kind")))]
    causes: list[Cause] = []
    for error in validator.iter_errors(obj):
        where = list(error.absolute_path)
        if error.validator == "required":
            missing = [k for k in error.validator_value if k not in (error.instance or {})]
            field = _field([*where, missing[0] if missing else ""])
            causes.append({"reason": "FieldValueRequired", "message": "Required value"})
        elif error.validator == "enum":
            field = _field(where)
            choices = ", ".join(_value(v) for v in error.validator_value)
            body = f"Unsupported value: {_value(error.instance)}: supported values: {choices}"
            causes.append({"reason": "FieldValueNotSupported", "message": body})
        else:
            field = _field(where)
            reason = "FieldValueTypeInvalid" if error.validator == "type" else "FieldValueInvalid"
            body = f"Invalid value: {_value(error.instance)}: {field} in body {error.message}"
            causes.append({"reason": reason, "message": body})
        causes[-1]["field"] = field
    if causes or not cel_rules or obj.get("kind") != "LLMDeployment":
        return causes  # the LLMModel CRD has no CEL rules
    for line in cel_lines(_llmd_schema(), obj, old):
        where, _, message = line.partition(": ")
        field = ("" if where == "<root>" else where) + _rule_field_paths().get(message, "")
        field = field.lstrip(".")
        body = f'Invalid value: "object": {message}'
        causes.append({"reason": "FieldValueInvalid", "message": body, "field": field})
    return causes


@functools.cache
def _rule_field_paths() -> dict[str, str]:
    """CEL rule message -> its ``fieldPath``, which the API server appends to the rule's
    node path when it reports the error."""
    found: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                if rule.get("fieldPath"):
                    found[rule["message"]] = rule["fieldPath"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(_llmd_schema())
    return found


def admit_custom(
    obj: dict[str, Any],
    request: rendering.Request,
    cel_rules: bool = True,
    old: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An LLMDeployment or LLMModel as the API server stores it: pruned, defaulted, validated.

    Unknown fields are pruned silently unless ``fieldValidation=Strict`` (what kubectl
    sends), which refuses them with 400 (k8s.io/apiserver/pkg/endpoints/handlers,
    "strict decoding error: unknown field"). The Warning header of ``Warn`` is not sent.
    """
    schema = _schemas().get(str(obj.get("kind")))
    if schema is None:
        return obj
    result = copy.deepcopy(obj)
    dropped = prune(result, schema, root=True)
    if dropped and request.params.get("fieldValidation") == "Strict":
        unknown = ", ".join(f'unknown field "{path}"' for path in dropped)
        raise BadRequestError(message=f"strict decoding error: {unknown}")
    default(result, schema)
    causes = schema_causes(result, cel_rules, old)
    if causes:
        raise invalid(result, causes)
    return result


# --- immutable fields of built-in kinds -------------------------------------------------------

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": decimal.Decimal("1e-9"), "u": decimal.Decimal("1e-6"), "m": decimal.Decimal("1e-3"),
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_QUANTITY = re.compile(r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)")


def quantity(text: Any) -> decimal.Decimal:
    """A resource quantity's value (k8s.io/apimachinery/pkg/api/resource); 0 when absent."""
    if text is None:
        return decimal.Decimal(0)
    match = _QUANTITY.fullmatch(str(text))
    if not match or match.group(2) not in _SUFFIXES:
        raise InvalidError(message=f"quantities must match the regular expression: {text!r}")
    return decimal.Decimal(match.group(1)) * decimal.Decimal(_SUFFIXES[match.group(2)])


def _semantic_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A PVC spec with quantities as numbers (apiequality.Semantic compares them by value)."""
    result = copy.deepcopy(dict(spec))
    for part in ("requests", "limits"):
        amounts = (result.get("resources") or {}).get(part)
        if isinstance(amounts, dict):
            result["resources"][part] = {k: quantity(v) for k, v in amounts.items()}
    return result


def pvc_update_causes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Cause]:
    """pkg/apis/core/validation/validation.go ValidatePersistentVolumeClaimUpdate, as in
    Kubernetes 1.33 (RecoverVolumeExpansionFailure on by default since 1.32): the spec is
    immutable except volumeName (set once) and, for a Bound claim, the storage request;
    a request may shrink back to, but not below or to, status.capacity."""
    old_spec = _semantic_spec(old.get("spec") or {})
    new_spec = _semantic_spec(new.get("spec") or {})
    if not old_spec.get("volumeName"):
        old_spec["volumeName"] = new_spec.get("volumeName")
        new_spec.setdefault("volumeName", None)
    requests = (new_spec.get("resources") or {}).get("requests")
    old_requests = (old_spec.get("resources") or {}).get("requests") or {}
    if (new.get("status") or {}).get("phase") == "Bound" and requests is not None:
        requests["storage"] = old_requests.get("storage")
    causes: list[Cause] = []
    if new_spec != old_spec:
        changed = sorted(k for k in {*old_spec, *new_spec} if old_spec.get(k) != new_spec.get(k))
        body = (
            "Forbidden: spec is immutable after creation except resources.requests and"
            f" volumeAttributesClassName for bound claims\n  changed: {', '.join(changed)}"
        )
        causes.append({"reason": "FieldValueForbidden", "message": body, "field": "spec"})
    storage = ("spec", "resources", "requests", "storage")
    old_size = quantity(_dig(old, storage))
    new_size = quantity(_dig(new, storage))
    capacity = quantity(_dig(old, ("status", "capacity", "storage")))
    if new_size < old_size and new_size <= capacity:
        causes.append(
            {
                "reason": "FieldValueForbidden",
                "message": "Forbidden: field can not be less than status.capacity",
                "field": "spec.resources.requests.storage",
            }
        )
    return causes


JOB_IMMUTABLE = (
    "selector",
    "template",
    "completionMode",
    "podFailurePolicy",
    "backoffLimitPerIndex",
    "managedBy",
    "successPolicy",
)


def job_update_causes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Cause]:
    """pkg/apis/batch/validation/validation.go ValidateJobSpecUpdate: selector, template and
    the failure/completion policies are immutable (ValidateImmutableField: "field is
    immutable"). The exception for a suspended Job that never started (scheduling
    directives may change) is not modelled: the operator never suspends its Jobs."""
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    return [
        {
            "reason": "FieldValueInvalid",
            "message": f"Invalid value: {_value(new_spec.get(key))}: field is immutable",
            "field": f"spec.{key}",
        }
        for key in JOB_IMMUTABLE
        if old_spec.get(key) != new_spec.get(key)
    ]


def _dig(obj: Any, path: Iterable[str]) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def update_causes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Cause]:
    """Immutable-field errors of an update, by kind."""
    kind = (str(new.get("apiVersion", "")), str(new.get("kind", "")))
    if kind == ("v1", "PersistentVolumeClaim"):
        return pvc_update_causes(old, new)
    if kind == ("batch/v1", "Job"):
        return job_update_causes(old, new)
    return []


# --- the hooks kube_api.py calls --------------------------------------------------------------


def _has_status(api: KubeAPI, request: rendering.Request) -> bool:
    return request.resource is not None and "status" in api.resources[request.resource].subresources


def admitted(
    api: KubeAPI,
    request: rendering.Request,
    current: Mapping[str, Any] | None,
    new: dict[str, Any],
    sent: str | None = None,
) -> dict[str, Any]:
    """The object a create (``current`` None) or update of ``new`` stores, or the error the
    API server answers: a stale resourceVersion, an invalid custom object, a changed
    immutable field. ``sent`` is the resourceVersion the request named."""
    cel = bool(getattr(api, "cel_rules", True))
    if current is None:
        return admit_custom(new, request, cel)
    stored = current.get("metadata", {}).get("resourceVersion")
    if sent is not None and sent != stored:
        raise stale(request)
    result = prepare_update(current, new, request.subresource, _has_status(api, request))
    result = admit_custom(result, request, cel, current)
    causes = update_causes(current, result)
    if causes:
        raise invalid(result, causes)
    return result


def admit_merge_patch(api: KubeAPI, request: rendering.Request, sent: str | None) -> None:
    """Rewrites a create's body or a merge patch so that what the fake stores is what the
    API server would, or raises its error (see ``admitted``)."""
    data: dict[str, Any] = request.data
    if request.action == enums.action.CREATE:
        result = admitted(api, request, None, data)
    elif request.action == enums.action.UPDATE and request.name is not None:
        current = api._current(request)
        if current is None:
            return  # the fake answers 404
        result = merge_diff(current, admitted(api, request, current, merged(current, data), sent))
    else:
        return
    if result is not data:
        data.clear()
        data.update(result)


# --- the scale subresource --------------------------------------------------------------------


def scale_paths(resource: Any) -> dict[str, str] | None:
    """The CRD's scale subresource paths for a resource, from the CRDs the fake installs
    (LLMDeployment and LLMModel)."""
    if resource is None:
        return None
    for crd in (crd_manifest(), model_crd_manifest()):
        if resource.plural != crd["spec"]["names"]["plural"]:
            continue
        if resource.group != crd["spec"]["group"]:
            return None
        for version in crd["spec"]["versions"]:
            if version["name"] == resource.version:
                paths: dict[str, str] | None = version.get("subresources", {}).get("scale")
                return paths
    return None


def _path(json_path: str) -> list[str]:
    return [part for part in json_path.split(".") if part]


def scale_of(obj: Mapping[str, Any], paths: Mapping[str, str]) -> dict[str, Any]:
    """An ``autoscaling/v1`` Scale of a custom resource, as
    k8s.io/apiextensions-apiserver/pkg/registry/customresource/etcd.go scaleFromCustomResource
    builds it (absent replicas read as 0; omitempty fields left out)."""
    meta = obj.get("metadata", {})
    spec_replicas = _dig(obj, _path(paths["specReplicasPath"])) or 0
    status_replicas = _dig(obj, _path(paths["statusReplicasPath"])) or 0
    selector = ""
    if paths.get("labelSelectorPath"):
        selector = _dig(obj, _path(paths["labelSelectorPath"])) or ""
    status: dict[str, Any] = {"replicas": int(status_replicas)}
    if selector:
        status["selector"] = selector
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            key: meta[key]
            for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if key in meta
        },
        "spec": {"replicas": int(spec_replicas)} if spec_replicas else {},
        "status": status,
    }


async def serve_scale(api: KubeAPI, request: rendering.Request) -> Any:
    """GET, PUT and merge PATCH of /scale, answering Scale objects.

    As etcd.go's ScaleREST: the request's Scale (the body of a PUT, or the stored object's
    Scale with the merge patch applied) is validated (spec.replicas >= 0,
    pkg/apis/autoscaling/validation ValidateScale), its resourceVersion, when set, is the
    precondition (409 when stale), and spec.replicas is written to specReplicasPath through
    an ordinary update, so generation, validation and the watch event follow.
    """
    import aiohttp.web

    from tests.fakes.kube_api import NotFoundError, manager_of, record_update

    paths = scale_paths(request.resource)
    if paths is None:
        raise k8s.KubernetesEndpointNotFoundError()
    async with api._lock:
        obj = api._stored(request)
        current = None if obj is None or obj.deleted else copy.deepcopy(dict(obj.raw))
        if current is None or obj is None:
            plural = request.resource.plural if request.resource else "object"
            raise NotFoundError(message=f'{plural} "{request.name}" not found')
        if request.method == enums.method.GET:
            return aiohttp.web.json_response(scale_of(current, paths))
        if request.method == enums.method.PUT and isinstance(request.data, dict):
            scale = copy.deepcopy(request.data)
        elif request.method == enums.method.PATCH and isinstance(request.data, dict):
            scale = merged(scale_of(current, paths), request.data)
        else:
            raise k8s.KubernetesError(status=415, reason="UnsupportedMediaType")
        replicas = (scale.get("spec") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or replicas < 0:
            cause = {
                "reason": "FieldValueInvalid",
                "message": f"Invalid value: {_value(replicas)}: must be greater than or equal to 0",
                "field": "spec.replicas",
            }
            raise invalid(scale, [cause])
        new = copy.deepcopy(current)
        target = new
        *parents, leaf = _path(paths["specReplicasPath"])
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = replicas
        # The scale's writer (the HPA, `kubectl scale`) now owns spec.replicas, as the
        # API server's field manager records for a subresource update.
        new.setdefault("metadata", {})["managedFields"] = record_update(
            current, new, manager_of(request), str(current.get("apiVersion", ""))
        )
        main = attrs.evolve(request, subresource=None)
        result = admitted(api, main, current, new, sent_version(scale))
        result["metadata"]["resourceVersion"] = str(next(api._versions))
        obj.create(result)
        raw = obj.raw
    assert request.resource is not None
    await api._buses[request.resource].put({"type": "MODIFIED", "object": raw})
    return aiohttp.web.json_response(scale_of(raw, paths))


# --- the watch cache (k8s.io/apiserver/pkg/storage/cacher) -----------------------------------


def expired(version: int, oldest: int) -> dict[str, Any]:
    """The ERROR event of a watch below the window: errors.NewResourceExpired as
    watch_cache.go getAllEventsSinceLocked raises it, sent by the cacher's errWatcher."""
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {version} ({oldest})",
            "reason": "Expired",
            "code": 410,
        },
    }


@attrs.define
class WatchCache:
    """Recent events per resource, as the API server's watch cache keeps them.

    A watch from resourceVersion N replays the retained events after N, then follows new
    ones; from "0" or none, it starts with an ADDED per existing object. A watch from below
    the oldest retained version gets an ERROR event with a 410 ``Expired`` Status and ends
    (k8s.io/apiserver/pkg/storage/cacher/watch_cache.go, cacher.go). ``capacity`` bounds the
    events kept per resource; ``expire()`` drops them all and ends every open watch, as an
    API server restart after an etcd compaction does.
    """

    next_version: Callable[[], str]
    capacity: int = 10_000  # upstream sizes it to ~75 s of events, up to 100 Ki
    bookmark_interval_s: float = 60.0
    _events: dict[Any, collections.deque[tuple[int, int, dict[str, Any]]]] = attrs.field(
        factory=dict
    )
    _floor: dict[Any, int] = attrs.field(factory=dict)
    _evicted: dict[Any, int] = attrs.field(factory=dict)
    _compacted: int = 0
    _sequence: int = 0
    _epoch: int = 0
    _latest: int = 0
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition)

    async def record(self, resource: Any, items: Iterable[Any]) -> None:
        """Keeps events as they are published; a DELETED one gets a resourceVersion of its own."""
        async with self._changed:
            for item in items:
                if not isinstance(item, dict) or "object" not in item:
                    continue
                if item.get("type") == "DELETED":
                    item["object"] = copy.deepcopy(item["object"])
                    meta = item["object"].setdefault("metadata", {})
                    meta["resourceVersion"] = self.next_version()
                version = _int((item["object"].get("metadata") or {}).get("resourceVersion"))
                version = version if version is not None else self._latest
                self._latest = max(self._latest, version)
                events = self._events.setdefault(resource, collections.deque())
                self._sequence += 1
                events.append((self._sequence, version, item))
                while len(events) > self.capacity:
                    sequence, dropped, _ = events.popleft()
                    self._floor[resource] = max(self._floor.get(resource, 0), dropped)
                    self._evicted[resource] = sequence
            self._changed.notify_all()

    async def expire(self) -> None:
        """Forgets every retained event and ends every open watch."""
        async with self._changed:
            self._compacted = int(self.next_version())
            for events in self._events.values():
                events.clear()
            self._epoch += 1
            self._changed.notify_all()

    async def serve(
        self,
        request: rendering.Request,
        kind: str,
        snapshot: Callable[[], list[dict[str, Any]]],
    ) -> AsyncIterator[Any]:
        """The events of one watch request, as the cacher streams them."""
        yield b""  # send the headers now
        params = request.params
        resource = request.resource
        wanted = dict(
            term.split("=", 1)
            for term in params.get("labelSelector", "").split(",")
            if "=" in term and "!=" not in term
        )
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        deadline = None if timeout is None else time.monotonic() + timeout
        since = params.get("resourceVersion") or "0"
        initial = params.get("sendInitialEvents") == "true"

        def matches(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            if request.namespace is not None and meta.get("namespace") != request.namespace:
                return False
            if request.name is not None and meta.get("name") != request.name:
                return False
            labels = meta.get("labels") or {}
            return all(labels.get(k) == v for k, v in wanted.items())

        error: dict[str, Any] | None = None
        replay: list[dict[str, Any]] = []
        async with self._changed:
            epoch = self._epoch
            position = self._sequence
            version = _int(since)
            floor = max(self._floor.get(resource, 0), self._compacted)
            if since == "0" or initial:
                replay = [{"type": "ADDED", "object": obj} for obj in snapshot() if matches(obj)]
            elif version is None:
                error = invalid_version(since)
            elif version < floor:
                error = expired(version, floor)
            else:
                # Versions grow with the sequence: walk back from the newest to the version.
                for _, at, event in reversed(self._events.get(resource, ())):
                    if at <= version:
                        break
                    if matches(event["object"]):
                        replay.append(event)
                replay.reverse()
            progress = max(self._latest, version or 0)
        if error is not None:
            yield error
            return

        def bookmark(annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
            meta: dict[str, Any] = {"resourceVersion": str(progress)}
            if annotations:
                meta["annotations"] = dict(annotations)
            group_version = f"{resource.group}/{resource.version}" if resource.group else "v1"
            body = {"kind": kind, "apiVersion": group_version, "metadata": meta}
            return {"type": "BOOKMARK", "object": body}

        for event in replay:
            yield event
        if initial and bookmarks:
            yield bookmark({"k8s.io/initial-events-end": "true"})
        next_bookmark = time.monotonic() + self.bookmark_interval_s
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if bookmarks:
                    yield bookmark()
                return
            timers = [t for t in (deadline, next_bookmark if bookmarks else None) if t is not None]
            wait_s = max(min(timers) - now, 0.001) if timers else None
            async with self._changed:
                if self._sequence == position and self._epoch == epoch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), wait_s)
                if self._epoch != epoch:
                    return
                if self._evicted.get(resource, 0) > position:
                    return  # fell behind the window: the cacher ends such a watcher
                fresh: list[tuple[int, int, dict[str, Any]]] = []
                for entry in reversed(self._events.get(resource, ())):  # newest first
                    if entry[0] <= position:
                        break
                    fresh.append(entry)
                fresh.reverse()
                position = self._sequence
                progress = max(progress, self._latest)
            for _, _, event in fresh:
                if matches(event["object"]):
                    yield event
            if bookmarks and time.monotonic() >= next_bookmark:
                yield bookmark()
                next_bookmark = time.monotonic() + self.bookmark_interval_s


def invalid_version(text: str) -> dict[str, Any]:
    """The ERROR event of a watch from a resourceVersion that is not a number."""
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"invalid resource version: {text}",
            "reason": "BadRequest",
            "code": 400,
        },
    }


def _int(text: Any) -> int | None:
    try:
        return int(str(text))
    except ValueError:
        return None


class RecordingBus(aiobus.Bus[Any]):
    """KMock's event bus of one resource, also recording into the watch cache."""

    def __init__(self, cache: WatchCache, resource: Any) -> None:
        super().__init__()
        self.cache = cache
        self.resource = resource

    async def put(self, *items: Any) -> None:
        await self.cache.record(self.resource, items)
        await super().put(*items)


class RecordingBuses(dict[Any, aiobus.Bus[Any]]):
    """The emulator's buses by resource, each one a RecordingBus."""

    def __init__(self, cache: WatchCache) -> None:
        super().__init__()
        self.cache = cache

    def __missing__(self, resource: Any) -> aiobus.Bus[Any]:
        bus = self[resource] = RecordingBus(self.cache, resource)
        return bus


def watch_snapshot(api: KubeAPI, request: rendering.Request) -> list[dict[str, Any]]:
    """The objects a watch from "0" starts with (its ADDED events)."""
    api._index()
    store = api._objects._objects
    keys = api._by_collection.get((request.resource, request.namespace), set())
    return [store[key].raw for key in keys if key in store and not store[key].deleted]


def watch(api: KubeAPI, request: rendering.Request) -> AsyncIterator[Any]:
    """A watch request's stream, from the fake's watch cache."""
    try:
        kind = api.resources[request.resource].kind or ""
    except KeyError:
        kind = ""
    return api.watch_cache.serve(request, kind, lambda: watch_snapshot(api, request))


def as_watch(api: KubeAPI, request: rendering.Request) -> rendering.Request:
    """A GET with ``watch=True`` (how the official Python clients send booleans) is a watch:
    the API server reads any value but 0/false/no as true (k8s.io/apimachinery/pkg/runtime,
    Convert_Slice_string_To_bool); KMock's parser knows only ``watch=true``."""
    flag = str(request.params.get("watch", "")).lower()
    if request.action == enums.action.WATCH or flag in ("", "0", "false", "no"):
        return request
    params = {**request.params, "watch": "true"}
    watching = attrs.evolve(request, params=params, action=enums.action.WATCH)
    for index, seen in enumerate(api._requests):
        if seen is request:
            api._requests[index] = watching  # KMock's filters find requests by identity
    return watching

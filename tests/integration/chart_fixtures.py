"""Helpers for the Helm chart tests: run the real helm, and check what it renders."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.schemas import schema_errors

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmops"
VALUE_SETS_DIR = Path(__file__).parent / "chart_values"
BIN = Path(sys.executable).parent
HELM = BIN / "helm"
KUBECTL = BIN / "kubectl"
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "llmops"
RELEASE = "llmops"

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def value_sets() -> dict[str, Path | None]:
    """Name -> values file; "default" renders the chart's own values.yaml alone."""
    sets: dict[str, Path | None] = {"default": None}
    sets.update({path.stem: path for path in sorted(VALUE_SETS_DIR.glob("*.yaml"))})
    return sets


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs helm; never raises on a non-zero exit (tests assert on it)."""
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=120, check=False
    )


def template_args(values_file: Path | None = None, sets: tuple[str, ...] = ()) -> list[str]:
    """Arguments of `helm template` for the chart with a values file and --set pairs."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", KUBERNETES_VERSION]
    if values_file is not None:
        args += ["--values", str(values_file)]
    for pair in sets:
        args += ["--set", pair]
    return args


@functools.cache
def _render(values_file: Path | None, sets: tuple[str, ...]) -> str:
    result = helm(*template_args(values_file, sets))
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def render(values_file: Path | None = None, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every object `helm template` renders (hooks included), as fresh dicts."""
    return [doc for doc in yaml.safe_load_all(_render(values_file, sets)) if doc]


def render_error(*sets: str) -> str:
    """The error of a `helm template` that must fail, with the given --set pairs."""
    result = helm(*template_args(None, sets))
    assert result.returncode != 0, f"helm template accepted {sets}"
    return result.stderr


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [obj for obj in objs if obj["kind"] == kind]


def named(objs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    """The one object of ``kind`` whose name ends with ``suffix``."""
    found = [obj for obj in by_kind(objs, kind) if obj["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, found {len(found)}"
    return found[0]


def validation_errors(objs: list[dict[str, Any]]) -> list[str]:
    """Schema violations of rendered objects: built-in kinds with kubernetes-validate, the
    Prometheus Operator kinds with their upstream CRDs, Kopf's peering kinds with the CRDs the
    chart itself renders."""
    rendered_crds = {}
    for crd in by_kind(objs, "CustomResourceDefinition"):
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            rendered_crds[key] = jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])
    errors = []
    for obj in objs:
        validator = rendered_crds.get((obj["apiVersion"], obj["kind"]))
        if validator is not None:
            errors += [f"{obj['kind']}: {e.message}" for e in validator.iter_errors(obj)]
        elif obj["apiVersion"].startswith("kopf.dev/"):
            errors.append(f"{obj['kind']}: the chart renders no CRD for it")
        else:
            errors += schema_errors(obj)
    return errors


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every workload."""
    for obj in objs:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in WORKLOAD_KINDS:
            yield where, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield where, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield where, obj["spec"]


def _quantity_set(resources: dict[str, Any], part: str) -> bool:
    values = resources.get(part) or {}
    return all(values.get(name) not in (None, "", 0) for name in ("cpu", "memory"))


def pod_violations(where: str, spec: dict[str, Any]) -> list[str]:
    """Violations of the restricted Pod Security Standard, of the platform's own rules
    (read-only root file systems) and missing resource requests or limits."""
    found = []
    pod_context = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(f"{where}: {flag} is true")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"{where}: volume {volume['name']} of type {sorted(kinds)}")
    if pod_context.get("runAsUser") == 0:
        found.append(f"{where}: pod runAsUser 0")
    containers = [*(spec.get("initContainers") or []), *spec["containers"]]
    for container in containers:
        at = f"{where} container {container['name']}"
        context = container.get("securityContext") or {}

        def setting(
            key: str, context: dict[str, Any] = context, pod: dict[str, Any] = pod_context
        ) -> Any:
            return context[key] if key in context else pod.get(key)

        if context.get("privileged"):
            found.append(f"{at}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{at}: allowPrivilegeEscalation is not false")
        if setting("runAsNonRoot") is not True:
            found.append(f"{at}: runAsNonRoot is not true")
        if setting("runAsUser") == 0:
            found.append(f"{at}: runAsUser 0")
        seccomp = (setting("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{at}: seccompProfile is {seccomp}")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{at}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{at}: adds capabilities {capabilities['add']}")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{at}: root file system is writable")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{at}: hostPort {port['hostPort']}")
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            if not _quantity_set(resources, part):
                found.append(f"{at}: no cpu and memory {part}")
    return found


def rbac_rules(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, rule) of every ClusterRole and Role."""
    for obj in objs:
        if obj["kind"] in ("ClusterRole", "Role"):
            where = (
                f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
            )
            for rule in obj.get("rules") or []:
                yield where, rule


def rbac_violations(objs: list[dict[str, Any]]) -> list[str]:
    """Wildcards anywhere in a rule, and access to Secrets beyond the operator's ``get``.

    The operator reads the resourceVersion of an LLMDeployment's credentials Secret (a new
    version names a new loader Job): ``get`` only, never list or watch (which would hand it
    every Secret's data as it changes), and no other component touches Secrets.
    """
    found = []
    for where, rule in rbac_rules(objs):
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            wild = [item for item in rule.get(field) or [] if "*" in item]
            if wild:
                found.append(f"{where}: {field} {wild}")
        if "secrets" in (rule.get("resources") or []):
            operator_get = where.endswith("-operator") and set(rule["verbs"]) == {"get"}
            if not operator_get:
                found.append(f"{where}: secrets {rule['verbs']}")
    return found


def container_env(container: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet would build it: Secret references resolved
    from ``secrets`` ("name/key" -> value) and $(VAR) references expanded."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secrets[f"{ref['name']}/{ref['key']}"]
        else:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda match: env.get(match.group(1), match.group(0)),
                item["value"],
            )
        env[item["name"]] = value
    return env


def container(objs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    """The first container of one workload."""
    containers: list[dict[str, Any]] = named(objs, kind, suffix)["spec"]["template"]["spec"][
        "containers"
    ]
    return containers[0]


def load_values() -> dict[str, Any]:
    """The chart's default values."""
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def camel(name: str) -> str:
    """snake_case -> camelCase, the chart's spelling of a settings field."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)

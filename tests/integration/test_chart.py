"""The Helm chart (charts/llmops), checked with the real helm and kubectl binaries.

Every value set in chart_values/ (and the defaults) must lint, render, validate against the
official schemas, meet the restricted Pod Security Standard and keep RBAC free of wildcards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops_gateway.keys import FileKeyStore, KeyFile, KeyIndex, Tenant
from llmops_gateway.settings import GatewaySettings
from llmops_operator.crd import (
    CRD_FILE_NAME,
    MODEL_CRD_FILE_NAME,
    crd_manifest,
    crd_yaml,
    model_crd_manifest,
    model_crd_yaml,
)
from llmops_operator.settings import OperatorSettings
from tests.conftest import free_port
from tests.exported_metrics import exported as exported_metrics
from tests.exported_metrics import used_in
from tests.integration.chart_fixtures import (
    BIN,
    CHART,
    KUBECTL,
    NAMESPACE,
    ROOT,
    by_kind,
    camel,
    container,
    container_env,
    helm,
    load_values,
    named,
    pod_specs,
    pod_violations,
    rbac_rules,
    rbac_violations,
    render,
    render_error,
    validation_errors,
    value_sets,
)
from tests.integration.gateway_fixtures import Gateway, gateway, stub_upstream
from tests.integration.operator_fixtures import DISCOVERY_NEEDS, OPERATOR_NEEDS

VALUE_SETS = value_sets()
SET_IDS = list(VALUE_SETS)

# Chart values that differ from the process defaults on purpose.
GATEWAY_CHART_DEFAULTS = {
    "host": "0.0.0.0",  # the process default 127.0.0.1 is unreachable from other pods
    "keys_file": "/etc/llmops/keys/keys.json",  # where the keys Secret is mounted
    "discover_backends": True,  # in a cluster, route to the LLMDeployments there
}
PEERING_VERBS = {"get", "list", "watch", "patch"}


def _objects(value_set: str) -> list[dict[str, Any]]:
    return render(VALUE_SETS[value_set])


def _granted(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def _missing(needs: dict[tuple[str, str], set[str]], granted: dict[Any, set[str]]) -> list[str]:
    return [
        f"{group or 'core'}/{resource}: {sorted(verbs - granted.get((group, resource), set()))}"
        for (group, resource), verbs in needs.items()
        if verbs - granted.get((group, resource), set())
    ]


# --- lint and render ----------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("value_set", SET_IDS)
def test_helm_lint_passes(value_set: str, strict: bool) -> None:
    args = ["lint", str(CHART), "--namespace", NAMESPACE]
    if strict:
        args.append("--strict")
    if VALUE_SETS[value_set] is not None:
        args += ["--values", str(VALUE_SETS[value_set])]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("value_set", SET_IDS)
def test_rendered_objects_match_the_official_schemas(value_set: str) -> None:
    objs = _objects(value_set)
    assert len(objs) >= 8, [obj["kind"] for obj in objs]
    errors = validation_errors(objs)
    assert not errors, "\n".join(errors)


def test_schema_check_catches_an_invalid_object() -> None:
    deployment = named(render(), "Deployment", "-gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    monitor = named(render(), "PodMonitor", "-gateway")
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    errors = validation_errors([deployment, monitor])
    assert any("imagePullPolice" in line for line in errors), errors
    assert any("intervall" in line for line in errors), errors


def test_default_install_has_every_component() -> None:
    objs = render()
    kinds = sorted(obj["kind"] for obj in objs)
    for kind, count in {
        "Deployment": 2,
        "StatefulSet": 1,
        "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 2,
        "PodMonitor": 2,
        "PrometheusRule": len(list((ROOT / "deploy" / "rules").glob("*.yaml"))),
        # The operator's, the gateway's (read-only discovery) and the two model-scaler
        # roles aggregated into admin/edit and view.
        "ClusterRole": 4,
        "ClusterRoleBinding": 2,
        "CustomResourceDefinition": 4,  # LLMDeployment, LLMModel and Kopf's two peering kinds
        "ClusterKopfPeering": 1,
        "NetworkPolicy": 4,
    }.items():
        assert kinds.count(kind) == count, f"{kind}: {kinds}"
    operator = named(objs, "Deployment", "-operator")
    assert operator["spec"]["replicas"] == 2
    gateway_service = named(objs, "Service", "-gateway")
    ports = {port["name"]: port["port"] for port in gateway_service["spec"]["ports"]}
    assert ports == {"http": 8080, "grpc": 50051}


# --- values and schema -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("gateway.replicaCout=3",), "additional properties 'replicaCout' not allowed"),
        (("gateway.config.redisURL=redis://x",), "additional properties 'redisURL' not allowed"),
        (("operator.config.workerLimt=5",), "additional properties 'workerLimt' not allowed"),
        (("gateway.replicaCount=three",), "at '/gateway/replicaCount': got string, want integer"),
        (("operator.config.standalone=maybe",), "'/operator/config/standalone': got string"),
        (("gateway.config.logFormat=xml",), "at '/gateway/config/logFormat'"),
        (("operator.config.workerLimit=0",), "minimum: got 0, want 1"),
        (("gateway.resources.limits=null",), "at '/gateway/resources': missing property 'limits'"),
    ],
    ids=[
        "unknown-key",
        "unknown-setting",
        "unknown-operator-setting",
        "wrong-type",
        "wrong-boolean",
        "not-in-enum",
        "below-minimum",
        "missing-limits",
    ],
)
def test_schema_rejects_invalid_values_readably(sets: tuple[str, ...], message: str) -> None:
    error = render_error(*sets)
    assert "values don't meet the specifications of the schema" in error
    assert message in error, error


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("gateway.terminationGracePeriodSeconds=30",),
            "must exceed gateway.preStopSleepSeconds + gateway.config.drainTimeoutS (40)",
        ),
        (("operator.config.standalone=true",), "set operator.replicaCount to 1"),
        (("gateway.config.redisUrl=redis://elsewhere:6379",), "set redis.enabled=false"),
        (
            ("gateway.autoscaling.minReplicas=5", "gateway.autoscaling.maxReplicas=3"),
            "minReplicas must not exceed",
        ),
    ],
    ids=["grace-too-short", "standalone-with-peers", "two-redis", "hpa-bounds"],
)
def test_templates_refuse_contradictory_values(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets)


def _schema_nodes(node: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            found.append((path, node))
        for key, value in node.items():
            found += _schema_nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _schema_nodes(value, f"{path}/{i}")
    return found


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    nodes = _schema_nodes(schema, "")
    assert len(nodes) > 30
    for path, node in nodes:
        assert "additionalProperties" in node, f"{path} accepts unknown keys"
        if "properties" in node:
            assert node["additionalProperties"] is False, f"{path} accepts unknown keys"
        elif node["additionalProperties"] is True:
            # Only Kubernetes structures passed through as they are (affinity parts,
            # tolerations, NetworkPolicy peers): the API server validates them.
            assert path == "/definitions/kubernetesObject", f"{path} accepts anything"


def test_values_yaml_has_a_comment_on_every_key() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for number, line in enumerate(lines, start=1):
        if not re.match(r"^\s*[A-Za-z0-9_./-]+:", line):
            continue
        before = [text for text in lines[: number - 1] if text.strip()]
        if not before or not before[-1].strip().startswith("#"):
            uncommented.append(f"{number}: {line.strip()}")
    assert not uncommented, "keys without a comment:\n" + "\n".join(uncommented)


@pytest.mark.parametrize(
    ("settings", "section", "chart_defaults"),
    [
        (GatewaySettings, "gateway", GATEWAY_CHART_DEFAULTS),
        (OperatorSettings, "operator", {}),
    ],
    ids=["gateway", "operator"],
)
def test_values_mirror_the_settings_one_to_one(
    settings: type[GatewaySettings] | type[OperatorSettings],
    section: str,
    chart_defaults: dict[str, Any],
) -> None:
    fields = settings.model_fields
    config = load_values()[section]["config"]
    assert set(config) == {camel(name) for name in fields}
    schema = json.loads((CHART / "values.schema.json").read_text())
    config_schema = schema["properties"][section]["properties"]["config"]
    assert set(config_schema["properties"]) == set(config)
    # Helm drops keys set to null before validating, so only non-nullable keys are required.
    nullable = {
        key for key, node in config_schema["properties"].items() if "null" in node.get("type", [])
    }
    assert set(config_schema["required"]) == set(config) - nullable
    process_defaults = settings.model_construct().model_dump(mode="json")
    for name in fields:
        expected = chart_defaults.get(name, process_defaults[name])
        assert config[camel(name)] == expected, f"{section}.config.{camel(name)}"


# --- the processes' environment ----------------------------------------------------------------


def _settings_from(
    env: dict[str, str], settings: type[Any], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    for name in [name for name in os.environ if name.startswith(prefix)]:
        monkeypatch.delenv(name)
    expected = {f"{prefix}{name.upper()}" for name in settings.model_fields}
    ours = {name for name in env if name.startswith(prefix)}
    assert ours <= expected, f"not settings: {sorted(ours - expected)}"
    for name in ours:
        monkeypatch.setenv(name, env[name])
    return settings()


@pytest.mark.parametrize("value_set", SET_IDS)
def test_rendered_environment_builds_the_settings(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = _objects(value_set)
    secrets = {
        f"{secret['metadata']['name']}/{key}": base64.b64decode(value).decode()
        for secret in by_kind(objs, "Secret")
        for key, value in secret["data"].items()
    }
    secrets.setdefault("llmops-redis-url/url", "rediss://:secret@redis.example:6380/0")
    values = yaml.safe_load(VALUE_SETS[value_set].read_text()) if VALUE_SETS[value_set] else {}

    env = container_env(container(objs, "Deployment", "-gateway"), secrets)
    gateway = _settings_from(env, GatewaySettings, "LLMOPS_GATEWAY_", monkeypatch)
    config = {**load_values()["gateway"]["config"], **values.get("gateway", {}).get("config", {})}
    assert gateway.host == config["host"]
    assert gateway.drain_timeout_s == config["drainTimeoutS"]
    assert gateway.backends == config["backends"]
    assert gateway.default_backend == config["defaultBackend"]
    redis = {**load_values()["redis"], **values.get("redis", {})}
    if redis["enabled"]:
        assert gateway.redis_url is not None
        assert gateway.redis_url.startswith("redis://")
        password = re.search(r"redis://:([^@]*)@", gateway.redis_url)
        assert bool(password) == redis["auth"]["enabled"]
        if password:
            assert "$(" not in password.group(1)
            assert len(password.group(1)) >= 16
    else:
        assert gateway.redis_url == "rediss://:secret@redis.example:6380/0"

    operator_env = container_env(container(objs, "Deployment", "-operator"), secrets)
    operator = _settings_from(operator_env, OperatorSettings, "LLMOPS_OPERATOR_", monkeypatch)
    operator_config = {
        **load_values()["operator"]["config"],
        **values.get("operator", {}).get("config", {}),
    }
    assert operator.namespaces == operator_config["namespaces"]
    assert operator.standalone == operator_config["standalone"]
    assert operator.log_format == operator_config["logFormat"]


def test_every_setting_reaches_the_process_environment() -> None:
    objs = render()
    env = {item["name"] for item in container(objs, "Deployment", "-gateway")["env"]}
    config = load_values()["gateway"]["config"]
    expected = {
        f"LLMOPS_GATEWAY_{name.upper()}"
        for name in GatewaySettings.model_fields
        if config[camel(name)] is not None
    }
    assert expected <= env, sorted(expected - env)
    assert "LLMOPS_GATEWAY_REDIS_URL" in env  # the in-chart Redis
    operator_env = {item["name"] for item in container(objs, "Deployment", "-operator")["env"]}
    operator_config = load_values()["operator"]["config"]
    assert operator_env == {
        f"LLMOPS_OPERATOR_{name.upper()}"
        for name in OperatorSettings.model_fields
        if operator_config[camel(name)] is not None  # null: the setting's default (None)
    }


# --- images -----------------------------------------------------------------------------------

DIGEST = "sha256:" + hashlib.sha256(b"llmops").hexdigest()


def _images(objs: list[dict[str, Any]]) -> dict[str, str]:
    return {where: spec["containers"][0]["image"] for where, spec in pod_specs(objs)}


def test_image_digest_wins_over_the_tag() -> None:
    """A digest pins the pulled content (`repository@sha256:...`, the form the kubelet and
    containerd resolve without the tag); a tag alone falls back as before."""
    tagged = _images(render())
    assert tagged == {
        "Deployment llmops-operator": "ghcr.io/llmops-dev/llmops-operator:0.1.0",
        "Deployment llmops-gateway": "ghcr.io/llmops-dev/llmops-gateway:0.1.0",
        "StatefulSet llmops-redis": "docker.io/library/redis:7.4.2-alpine",
        "Pod llmops-test-models": "ghcr.io/llmops-dev/llmops-gateway:0.1.0",  # `helm test`
    }
    sets = tuple(
        f"{component}.image.{field}={value}"
        for component in ("operator", "gateway", "redis")
        for field, value in (("tag", "9.9.9"), ("digest", DIGEST))
    )
    pinned = _images(render(None, sets))
    assert pinned == {
        where: f"{image.rsplit(':', 1)[0]}@{DIGEST}" for where, image in tagged.items()
    }
    assert "redis.image.tag or redis.image.digest is required" in render_error("redis.image.tag=")
    assert "does not match pattern" in render_error("gateway.image.digest=sha256:abc")


# --- pods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", SET_IDS)
def test_every_pod_meets_the_restricted_profile(value_set: str) -> None:
    specs = list(pod_specs(_objects(value_set)))
    assert len(specs) >= 2
    violations = [line for where, spec in specs for line in pod_violations(where, spec)]
    assert not violations, "\n".join(violations)


def test_pod_check_catches_violations() -> None:
    where, spec = next(pod_specs(render()))
    spec["hostNetwork"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    main = spec["containers"][0]
    main["securityContext"]["allowPrivilegeEscalation"] = True
    main["securityContext"]["capabilities"] = {"drop": ["NET_RAW"], "add": ["SYS_ADMIN"]}
    main["securityContext"]["runAsUser"] = 0
    del main["securityContext"]["readOnlyRootFilesystem"]
    del main["resources"]["limits"]
    found = "\n".join(pod_violations(where, spec))
    for problem in [
        "hostNetwork",
        "hostPath",
        "allowPrivilegeEscalation",
        "do not drop ALL",
        "SYS_ADMIN",
        "runAsUser 0",
        "root file system is writable",
        "no cpu and memory limits",
    ]:
        assert problem in found, found


def test_gateway_drains_streams_before_it_is_killed() -> None:
    for value_set, drain in [("default", 30), ("minimal", 120.5)]:
        pod = named(_objects(value_set), "Deployment", "-gateway")["spec"]["template"]["spec"]
        pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    computed = render(None, ("gateway.preStopSleepSeconds=20", "gateway.config.drainTimeoutS=90"))
    pod = named(computed, "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 20 + 90
    gateway = container(render(), "Deployment", "-gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["command"] == ["llmops", "gateway"]


def test_keys_secret_is_mounted_where_the_gateway_reads_it() -> None:
    values = load_values()["gateway"]
    for sets in [(), ("gateway.config.keysFile=/var/run/llmops/tenants.json",)]:
        objs = render(None, sets)
        pod = named(objs, "Deployment", "-gateway")["spec"]["template"]["spec"]
        env = {item["name"]: item.get("value") for item in pod["containers"][0]["env"]}
        keys_file = env["LLMOPS_GATEWAY_KEYS_FILE"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "keys")
        volume = next(v for v in pod["volumes"] if v["name"] == "keys")
        # A subPath mount would never see Secret updates.
        assert "subPath" not in mount
        assert mount["mountPath"] == posixpath.dirname(keys_file)
        assert volume["secret"]["secretName"] == values["keys"]["existingSecret"]
        assert volume["secret"]["items"] == [
            {"key": values["keys"]["secretKey"], "path": posixpath.basename(keys_file)}
        ]
    pod = named(render(None, ("gateway.config.keysFile=null",)), "Deployment", "-gateway")
    assert "keys" not in {v["name"] for v in pod["spec"]["template"]["spec"]["volumes"]}


def test_operator_probes_and_ports_follow_its_settings() -> None:
    operator = container(render(), "Deployment", "-operator")
    assert operator["command"] == ["llmops", "operator"]
    ports = {port["name"]: port["containerPort"] for port in operator["ports"]}
    assert ports == {"metrics": 9090, "health": 8081}
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    quiet = render(None, ("operator.config.healthPort=0", "operator.config.metricsPort=0"))
    operator = container(quiet, "Deployment", "-operator")
    assert "livenessProbe" not in operator
    assert "ports" not in operator
    assert not [
        m for m in by_kind(quiet, "PodMonitor") if m["metadata"]["name"].endswith("-operator")
    ]


# --- helm test -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    """The gateway process in front of the stub upstream, with one tenant's key."""
    folder = tmp_path_factory.mktemp("helm-test")
    keys = FileKeyStore(folder / "keys.json")
    _, key = keys.create(Tenant(name="helm-test"))
    with (
        stub_upstream(models=("stub-chat", "stub-embed")) as upstream,
        gateway(folder, default_backend=upstream, keys_file=keys.path) as running,
    ):
        yield running, key


def _run_hook(
    sets: tuple[str, ...], url: str, secrets: dict[str, str] | None = None, timeout_s: int = 30
) -> subprocess.CompletedProcess[str]:
    """Runs the rendered test Pod's command here, with its environment, against ``url``."""
    objs = render(None, sets)
    (pod,) = by_kind(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (main,) = pod["spec"]["containers"]
    assert main["image"] == container(objs, "Deployment", "-gateway")["image"]
    env = container_env(main, secrets or {})
    service = named(objs, "Service", "-gateway")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert env["LLMOPS_TEST_URL"] == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}"
    env.update(LLMOPS_TEST_URL=url, LLMOPS_TEST_TIMEOUT_S=str(timeout_s))
    assert main["command"][:2] == ["python", "-c"]
    return subprocess.run(
        [sys.executable, *main["command"][1:]],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
        check=False,
    )


def test_helm_test_hook_asks_the_gateway_for_its_models(
    live_gateway: tuple[Gateway, str],
) -> None:
    """The `helm test` Pod (a `helm.sh/hook: test` Pod, which Helm runs and judges by its exit
    code) passes against the real gateway process and fails where a broken install would."""
    gw, key = live_gateway
    without_key = _run_hook((), gw.url)
    assert without_key.returncode == 0, without_key.stderr
    assert "401 without a key" in without_key.stdout

    keyed = ("helmTest.apiKeySecret.name=helm-test-key", "helmTest.expectModels={stub-chat}")
    with_key = _run_hook(keyed, gw.url, {"helm-test-key/api-key": key})
    assert with_key.returncode == 0, with_key.stderr
    assert "stub-chat" in with_key.stdout

    wrong_key = _run_hook(keyed, gw.url, {"helm-test-key/api-key": "llmops_wrong"})
    assert wrong_key.returncode == 1
    assert "expected 200 with the key, got HTTP 401" in wrong_key.stderr
    missing = _run_hook(
        ("helmTest.apiKeySecret.name=helm-test-key", "helmTest.expectModels={stub-chat,absent}"),
        gw.url,
        {"helm-test-key/api-key": key},
    )
    assert missing.returncode == 1
    assert "models ['absent'] are not listed" in missing.stderr
    # Something that answers without checking keys is not the gateway.
    with stub_upstream() as stub:
        unauthenticated = _run_hook((), stub)
    assert unauthenticated.returncode == 1
    assert "expected 401 invalid_api_key, got HTTP 200" in unauthenticated.stderr
    down = _run_hook((), f"http://127.0.0.1:{free_port()}", timeout_s=1)
    assert down.returncode == 1
    assert "no answer" in down.stderr

    assert "helmTest.expectModels needs helmTest.apiKeySecret.name" in render_error(
        "helmTest.expectModels={stub-chat}"
    )
    assert not by_kind(render(None, ("helmTest.enabled=false",)), "Pod")


# --- RBAC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", SET_IDS)
def test_rbac_has_no_wildcards_and_no_secrets(value_set: str) -> None:
    objs = _objects(value_set)
    assert list(rbac_rules(objs))
    violations = rbac_violations(objs)
    assert not violations, "\n".join(violations)


def test_rbac_check_catches_wildcards_and_secrets() -> None:
    role = named(render(), "ClusterRole", "-operator")
    role["rules"] += [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]},
        {"apiGroups": ["ray.io"], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["get"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["*"]},
    ]
    found = "\n".join(rbac_violations([role]))
    for field in ("secrets", "resources", "apiGroups", "verbs"):
        assert f"{field} " in found, found


def test_cluster_wide_rbac_covers_the_operator() -> None:
    objs = render()
    role = named(objs, "ClusterRole", "-operator")
    granted = _granted(role["rules"])
    needs = {
        **OPERATOR_NEEDS,
        **DISCOVERY_NEEDS,
        ("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS,
    }
    assert not _missing(needs, granted)
    assert set(granted) == set(needs), "grants beyond what the operator needs"
    binding = named(objs, "ClusterRoleBinding", "-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = named(objs, "ServiceAccount", "-operator")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    assert not by_kind(objs, "Role")


def _component(objs: list[dict[str, Any]], kind: str, component: str) -> list[dict[str, Any]]:
    return [
        obj
        for obj in by_kind(objs, kind)
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]


def test_namespaced_mode_grants_per_namespace() -> None:
    objs = render(VALUE_SETS["namespaced"])
    namespaces = ["llmops-demo", "team-a"]
    roles = _component(objs, "Role", "operator")
    assert sorted(role["metadata"]["namespace"] for role in roles) == namespaces
    for role in roles:
        granted = _granted(role["rules"])
        needs = {**OPERATOR_NEEDS, ("kopf.dev", "kopfpeerings"): PEERING_VERBS}
        assert not _missing(needs, granted)
        assert set(granted) == set(needs)
    bindings = _component(objs, "RoleBinding", "operator")
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == namespaces
    # Cluster-wide: read-only discovery, nothing else.
    (cluster_role,) = _component(objs, "ClusterRole", "operator")
    assert _granted(cluster_role["rules"]) == DISCOVERY_NEEDS
    peerings = by_kind(objs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == namespaces
    assert not by_kind(objs, "ClusterKopfPeering")
    strict = render(VALUE_SETS["namespaced"], ("operator.rbac.clusterDiscovery=false",))
    assert not _component(strict, "ClusterRole", "operator")
    assert not by_kind(strict, "ClusterRoleBinding")


GATEWAY_NEEDS = {("llmops.dev", "llmdeployments"): {"list", "watch"}}
# `kubectl scale llmmodel` reads the Scale, then PATCHes it (PUT with --resource-version).
SCALER_NEEDS = {
    ("llmops.dev", "llmmodels"): {"get", "list", "watch"},
    ("llmops.dev", "llmmodels/scale"): {"get", "update", "patch"},
}


def test_namespace_editors_may_scale_a_model_and_nothing_more() -> None:
    """Roles labelled aggregate-to-edit/admin/view are merged into the built-in roles by the
    clusterrole-aggregation controller (pkg/controller/clusterroleaggregation)."""
    for values in (None, VALUE_SETS["namespaced"]):
        objs = render(values)
        roles = {r["metadata"]["name"]: r for r in _component(objs, "ClusterRole", "model-scaler")}
        (scaler,) = [r for n, r in roles.items() if not n.endswith("-view")]
        (viewer,) = [r for n, r in roles.items() if n.endswith("-view")]
        assert _granted(scaler["rules"]) == SCALER_NEEDS
        labels = scaler["metadata"]["labels"]
        assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
        assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
        assert _granted(viewer["rules"]) == {("llmops.dev", "llmmodels"): {"get", "list", "watch"}}
        assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"]
    off = render(sets=("operator.rbac.create=false",))
    assert not _component(off, "ClusterRole", "model-scaler")


def test_gateway_reads_llmdeployments_and_nothing_else() -> None:
    objs = render()
    role = named(objs, "ClusterRole", "-gateway")
    assert _granted(role["rules"]) == GATEWAY_NEEDS
    binding = named(objs, "ClusterRoleBinding", "-gateway")
    account = named(objs, "ServiceAccount", "-gateway")["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    pod = named(objs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True


def test_gateway_discovery_per_namespace_or_off() -> None:
    namespaced = render(VALUE_SETS["namespaced"])
    assert not _component(namespaced, "ClusterRole", "gateway")
    roles = _component(namespaced, "Role", "gateway")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["llmops-demo", "team-a"]
    assert all(_granted(r["rules"]) == GATEWAY_NEEDS for r in roles)
    bindings = _component(namespaced, "RoleBinding", "gateway")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["llmops-demo", "team-a"]

    off = render(sets=("gateway.config.discoverBackends=false",))
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not _component(off, kind, "gateway"), kind
    pod = named(off, "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert _egress_ports(named(off, "NetworkPolicy", "-gateway")) == {53, 6379, 8000}


# --- peering -----------------------------------------------------------------------------------


def test_peering_objects_exist_for_active_standby() -> None:
    objs = render()
    crds = {
        crd["metadata"]["name"]: crd
        for crd in by_kind(objs, "CustomResourceDefinition")
        if crd["spec"]["group"] == "kopf.dev"
    }
    assert set(crds) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for crd in crds.values():
        # Shared by every Kopf operator in the cluster: uninstalling must not delete them.
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (peering,) = by_kind(objs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == load_values()["operator"]["config"]["peeringName"]
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    # Where the kopf.dev API is served, only missing objects are rendered (lookup); offline
    # rendering sees none, so the object is there.
    served = render(None, ("operator.config.peeringName=llmops-ha",))
    assert [p["metadata"]["name"] for p in by_kind(served, "ClusterKopfPeering")] == ["llmops-ha"]
    standalone = render(VALUE_SETS["minimal"])
    assert not by_kind(standalone, "ClusterKopfPeering")
    assert [crd["spec"]["group"] for crd in by_kind(standalone, "CustomResourceDefinition")] == [
        "llmops.dev",  # LLMDeployment
        "llmops.dev",  # LLMModel
    ]


# --- the LLMDeployment CRD ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_name", "manifest", "text"),
    [
        (CRD_FILE_NAME, crd_manifest, crd_yaml),
        (MODEL_CRD_FILE_NAME, model_crd_manifest, model_crd_yaml),
    ],
    ids=["llmdeployment", "llmmodel"],
)
def test_crd_upgrades_with_the_release_and_outlives_it(
    file_name: str,
    manifest: Callable[[], dict[str, Any]],
    text: Callable[[], str],
) -> None:
    """Helm installs a chart's crds/ once and never upgrades or deletes it
    (helm.sh/docs/chart_best_practices/custom_resource_definitions); a template is part of the
    release manifest that `helm upgrade` applies, and `helm.sh/resource-policy: keep` makes
    `helm uninstall` leave it (pkg/action/resource_policy.go). Both the LLMDeployment CRD and
    the per-model LLMModel CRD (its scale target) ship so."""
    show = helm("show", "crds", str(CHART))
    assert show.returncode == 0, show.stderr
    assert show.stdout.strip() == "", "Helm would install crds/ once and never upgrade it"
    (crd,) = [
        crd
        for crd in by_kind(render(), "CustomResourceDefinition")
        if crd["metadata"]["name"] == manifest()["metadata"]["name"]
    ]
    # `llmops crd --write charts/llmops/crds` writes the file the template reads.
    written = CHART / "crds" / file_name
    assert (CHART / "files" / "crds" / file_name).resolve() == written.resolve()
    committed = yaml.safe_load(written.read_text())
    assert crd["spec"] == committed["spec"]
    assert crd["metadata"]["name"] == committed["metadata"]["name"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert written.read_text() == text(), "run `llmops crd --write charts/llmops/crds`"
    managed_elsewhere = render(None, ("crds.create=false",))
    assert [c["spec"]["group"] for c in by_kind(managed_elsewhere, "CustomResourceDefinition")] == [
        "kopf.dev",
        "kopf.dev",
    ]


# --- network policies ----------------------------------------------------------------------------


def _egress_ports(policy: dict[str, Any]) -> set[int]:
    return {port["port"] for rule in policy["spec"]["egress"] for port in rule.get("ports", [])}


def test_network_policies_allow_only_what_each_component_needs() -> None:
    objs = render()
    deny = named(objs, "NetworkPolicy", "-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"]
    assert "egress" not in deny["spec"]
    # The operator's children share the name label: only the chart's components are denied.
    (expression,) = deny["spec"]["podSelector"]["matchExpressions"]
    assert sorted(expression["values"]) == ["gateway", "operator", "redis"]

    gateway = named(objs, "NetworkPolicy", "-gateway")
    # DNS, Redis, the graphs, and the API server for the watch on LLMDeployments.
    assert _egress_ports(gateway) == {53, 6379, 8000, 443, 6443}
    api_rule, metrics_rule = gateway["spec"]["ingress"]
    assert {p["port"] for p in api_rule["ports"]} == {8080, 50051}
    assert "from" not in api_rule
    assert [p["port"] for p in metrics_rule["ports"]] == [9464]
    assert "namespaceSelector" in metrics_rule["from"][0]

    operator = named(objs, "NetworkPolicy", "-operator")
    assert _egress_ports(operator) == {53, 443, 6443}
    assert [p["port"] for p in operator["spec"]["ingress"][0]["ports"]] == [9090]

    redis = named(objs, "NetworkPolicy", "-redis")
    assert redis["spec"]["egress"] == []
    (rule,) = redis["spec"]["ingress"]
    labels = rule["from"][0]["podSelector"]["matchLabels"]
    assert labels["app.kubernetes.io/component"] == "gateway"

    namespaced = named(render(VALUE_SETS["namespaced"]), "NetworkPolicy", "-gateway")
    backend_rule = next(r for r in namespaced["spec"]["egress"] if r["ports"][0]["port"] == 8000)
    selected = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in backend_rule["to"]
        if "namespaceSelector" in peer
    ]
    assert selected == ["llmops-demo", "team-a"]
    assert not by_kind(render(VALUE_SETS["monitoring-off"]), "NetworkPolicy")


# --- exposure: Ingress, HTTPRoute, TLS ----------------------------------------------------------

EXPOSURE_KINDS = ("Ingress", "HTTPRoute", "Certificate", "ReferenceGrant")


def _api_rules(policy: dict[str, Any], port: int = 8080) -> list[dict[str, Any]]:
    return [
        rule
        for rule in policy["spec"]["ingress"]
        if port in {item["port"] for item in rule["ports"]}
    ]


def test_exposure_is_off_by_default() -> None:
    objs = render()
    assert not [obj["kind"] for obj in objs if obj["kind"] in EXPOSURE_KINDS]
    (api_rule,) = _api_rules(named(objs, "NetworkPolicy", "-gateway"))
    assert "from" not in api_rule


def test_ingress_routes_the_rest_api_with_a_cert_manager_certificate() -> None:
    """Ingress backends name a Service port (networking.k8s.io/v1 IngressServiceBackend);
    cert-manager writes the Certificate's spec.secretName, which the Ingress TLS entry reads."""
    values = yaml.safe_load(VALUE_SETS["ingress"].read_text())
    objs = _objects("ingress")
    service = named(objs, "Service", "-gateway")
    ingress = named(objs, "Ingress", "-gateway")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == values["gateway"]["ingress"]["annotations"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    assert backend["port"]["name"] == "http"
    certificate = named(objs, "Certificate", "-gateway")
    assert ingress["spec"]["tls"] == [
        {"hosts": ["llm.example.com"], "secretName": certificate["spec"]["secretName"]}
    ]
    assert certificate["spec"]["dnsNames"] == ["llm.example.com"]
    assert certificate["spec"]["issuerRef"] == {
        "group": "cert-manager.io",
        "kind": "ClusterIssuer",
        "name": "letsencrypt-prod",
    }
    assert not by_kind(objs, "ReferenceGrant")
    # apiFrom admits one namespace (and the helm test Pod); the controller gets the REST port.
    policy = named(objs, "NetworkPolicy", "-gateway")
    restricted, controller = _api_rules(policy)
    assert restricted["from"][0] == values["networkPolicy"]["gateway"]["apiFrom"][0]
    assert controller["from"] == load_values()["networkPolicy"]["gateway"]["ingressControllerFrom"]
    assert controller["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    assert [item["port"] for item in controller["ports"]] == [8080]
    plain = render(None, ("gateway.ingress.enabled=true",))
    (open_rule,) = named(plain, "Ingress", "-gateway")["spec"]["rules"]
    assert "host" not in open_rule
    assert "tls" not in named(plain, "Ingress", "-gateway")["spec"]
    assert not by_kind(plain, "Certificate")


def test_httproute_attaches_to_the_platform_gateway_with_its_certificate() -> None:
    """HTTPRoute backendRefs name a Service port number; a Gateway listener's certificateRefs
    to a Secret in another namespace need a ReferenceGrant there (Gateway API v1.6.1,
    apis/v1/gateway_types.go GatewayTLSConfig)."""
    objs = _objects("httproute")
    service = named(objs, "Service", "-gateway")
    route = named(objs, "HTTPRoute", "-gateway")
    assert route["spec"]["parentRefs"] == [
        {"name": "public", "namespace": "gateway-system", "sectionName": "https"}
    ]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["timeouts"] == {"request": "600s"}
    http = next(port for port in service["spec"]["ports"] if port["name"] == "http")
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": http["port"]}]
    grant = named(objs, "ReferenceGrant", "-gateway-tls")
    assert grant["metadata"]["namespace"] == NAMESPACE
    assert grant["spec"] == {
        "from": [
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "gateway-system"}
        ],
        "to": [{"group": "", "kind": "Secret", "name": "llm-example-com-tls"}],
    }
    assert not by_kind(objs, "Certificate")  # the platform team's Secret
    (controller,) = [r for r in _api_rules(named(objs, "NetworkPolicy", "-gateway")) if "from" in r]
    assert controller["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "envoy-gateway-system"
    }
    # A Gateway in the release namespace reads the Secret without a grant.
    local = render(
        VALUE_SETS["httproute"], ("gateway.httpRoute.parentRefs[0].namespace=" + NAMESPACE,)
    )
    assert not by_kind(local, "ReferenceGrant")


def test_one_certificate_covers_the_ingress_and_the_route() -> None:
    both = (
        "gateway.ingress.enabled=true",
        "gateway.ingress.hosts={llm.example.com,api.example.com}",
        "gateway.tls.certManager.enabled=true",
        "gateway.tls.certManager.issuerRef.kind=Issuer",
        "gateway.tls.certManager.issuerRef.name=internal-ca",
    )
    objs = render(VALUE_SETS["httproute"], both)
    errors = validation_errors(objs)
    assert not errors, "\n".join(errors)
    (certificate,) = by_kind(objs, "Certificate")
    assert certificate["spec"]["dnsNames"] == ["llm.example.com", "api.example.com"]
    assert certificate["spec"]["secretName"] == "llm-example-com-tls"
    assert certificate["spec"]["issuerRef"]["kind"] == "Issuer"
    (ingress_tls,) = named(objs, "Ingress", "-gateway")["spec"]["tls"]
    assert ingress_tls["secretName"] == certificate["spec"]["secretName"]
    grant = named(objs, "ReferenceGrant", "-gateway-tls")
    assert grant["spec"]["to"][0]["name"] == certificate["spec"]["secretName"]


def test_schema_check_catches_invalid_exposure_objects() -> None:
    objs = render(
        VALUE_SETS["httproute"],
        ("gateway.ingress.enabled=true", "gateway.ingress.hosts={llm.example.com}"),
    )
    route = named(objs, "HTTPRoute", "-gateway")
    route["spec"]["rules"][0]["backendRefs"][0]["prot"] = 8080
    grant = named(objs, "ReferenceGrant", "-gateway-tls")
    grant["spec"]["to"][0]["secretName"] = "x"
    ingress = named(objs, "Ingress", "-gateway")
    ingress["spec"]["rules"][0]["http"]["paths"][0]["pathTyp"] = "Prefix"
    found = "\n".join(validation_errors([route, grant, ingress]))
    for typo in ("prot", "secretName", "pathTyp"):
        assert typo in found, found


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("gateway.tls.enabled=true",), "needs gateway.ingress.enabled or gateway.httpRoute"),
        (("gateway.httpRoute.enabled=true",), "gateway.httpRoute.parentRefs must name"),
        (
            ("gateway.ingress.enabled=true", "gateway.tls.enabled=true"),
            "needs gateway.ingress.hosts",
        ),
        (
            (
                "gateway.ingress.enabled=true",
                "gateway.ingress.hosts={llm.example.com}",
                "gateway.tls.enabled=true",
                "gateway.tls.certManager.enabled=true",
            ),
            "issuerRef.name is required",
        ),
        (("gateway.tls.certManager.enabled=true",), "certManager.enabled needs gateway.tls"),
        (("gateway.ingress.hosts={LLM_host}",), "at '/gateway/ingress/hosts/0'"),
        (("gateway.tls.certManager.issuerRef.kind=Vault",), "issuerRef/kind"),
        (("gateway.httpRoute.parentRefs[0].nmae=x",), "additional properties 'nmae'"),
        (("gateway.httpRoute.timeouts.request=10 minutes",), "/gateway/httpRoute/timeouts/request"),
    ],
    ids=[
        "tls-without-exposure",
        "route-without-parent",
        "tls-without-hosts",
        "cert-manager-without-issuer",
        "cert-manager-without-tls",
        "bad-host",
        "bad-issuer-kind",
        "parent-ref-typo",
        "bad-timeout",
    ],
)
def test_exposure_refuses_contradictory_values(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets)


# --- monitoring ---------------------------------------------------------------------------------


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob(pattern))}


@pytest.mark.parametrize(("kind", "pattern"), [("rules", "*.yaml"), ("dashboards", "*.json")])
def test_chart_copies_of_rules_and_dashboards_match_deploy(kind: str, pattern: str) -> None:
    source = _files(ROOT / "deploy" / kind, pattern)
    copies = _files(CHART / "files" / kind, pattern)
    assert sorted(copies) == sorted(source), f"copy deploy/{kind}/ to charts/llmops/files/{kind}/"
    for name, content in source.items():
        assert copies[name] == content, f"charts/llmops/files/{kind}/{name} differs from deploy/"


def test_rules_and_dashboards_are_rendered_from_deploy() -> None:
    objs = render()
    rules = {rule["metadata"]["name"]: rule for rule in by_kind(objs, "PrometheusRule")}
    sources = sorted((ROOT / "deploy" / "rules").glob("*.yaml"))
    assert sources, "deploy/rules/ holds the platform's alerts"
    for path in sources:
        rule = rules[f"llmops-{path.stem}"]
        assert rule["spec"] == yaml.safe_load(path.read_text())
    dashboards = sorted((ROOT / "deploy" / "dashboards").glob("*.json"))
    maps = [m for m in by_kind(objs, "ConfigMap") if "-dashboard-" in m["metadata"]["name"]]
    assert len(maps) == len(dashboards)
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        (name, text) = next(iter(config_map["data"].items()))
        assert json.loads(text) == json.loads((ROOT / "deploy" / "dashboards" / name).read_text())
    off = render(VALUE_SETS["monitoring-off"])
    assert not [o for o in off if o["apiVersion"].startswith("monitoring.coreos.com/")]


def test_alerts_use_the_metrics_the_platform_exports() -> None:
    used = used_in((ROOT / "deploy" / "rules" / "platform.yaml").read_text())
    assert used
    exported = exported_metrics()
    assert used <= exported, f"not exported: {sorted(used - exported)}"


# --- images -------------------------------------------------------------------------------------


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of the last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    instructions = [
        (match.group(1).upper(), match.group(2).strip())
        for match in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, flags=re.MULTILINE)
        if not match.group(0).lstrip().startswith("#")
    ]
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


DOCKERFILES = sorted((ROOT / "deploy" / "images").glob("*.Dockerfile"))


def test_there_is_an_image_per_component() -> None:
    assert [path.name for path in DOCKERFILES] == [
        "gateway.Dockerfile",
        "operator.Dockerfile",
        "worker.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_image_entry_point_is_an_llmops_command(dockerfile: Path) -> None:
    stage = _final_stage(dockerfile)
    argv: list[str] = []
    for name, arguments in stage:
        if name in ("ENTRYPOINT", "CMD"):
            assert arguments.startswith("["), f"{name} must use the exec form: {arguments}"
            argv += json.loads(arguments)
    assert argv[:1] == ["llmops"], argv
    subcommand = argv[1]
    result = subprocess.run(
        [str(BIN / "llmops"), subcommand, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"`llmops {subcommand}` is missing:\n{result.stderr}"
    users = [arguments for name, arguments in stage if name == "USER"]
    assert users, "the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: numeric, so that runAsNonRoot can be checked"
    assert int(uid) != 0


# --- keys -------------------------------------------------------------------------------------


def test_example_tenant_keys_become_the_secret_the_gateway_mounts(tmp_path: Path) -> None:
    store = tmp_path / "keys.json"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    created = subprocess.run(
        [str(ROOT / "deploy" / "tenants" / "create-keys.sh"), str(store)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    keys = dict(line.split(":", 1) for line in created.stdout.splitlines())
    keys = {tenant: key.strip() for tenant, key in keys.items()}
    assert set(keys) == {"chat-app", "batch-eval", "trial"}

    values = load_values()["gateway"]["keys"]
    secret_name, secret_key = values["existingSecret"], values["secretKey"]
    readme = (ROOT / "deploy" / "tenants" / "README.md").read_text()
    command = f"kubectl create secret generic {secret_name} -n {NAMESPACE}"
    assert command in readme
    manifest = subprocess.run(
        [
            str(KUBECTL),
            *command.split()[1:],
            f"--from-file={secret_key}={store}",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert manifest.returncode == 0, manifest.stderr
    secret = yaml.safe_load(manifest.stdout)
    assert secret["metadata"] == {"name": secret_name, "namespace": NAMESPACE}
    document = KeyFile.model_validate_json(base64.b64decode(secret["data"][secret_key]))
    index = KeyIndex(document)
    for tenant, key in keys.items():
        _, found = index.authenticate(key)
        assert found.name == tenant
    assert index.tenants["trial"].allowed_models == ["smollm2-135m-instruct"]

"""Owner references the operator writes are admitted by the RBAC the chart grants it."""

from __future__ import annotations

from typing import Any

import pytest

from llmops_operator import render
from tests.integration.chart_fixtures import by_kind, value_sets
from tests.integration.chart_fixtures import render as render_chart
from tests.integration.operator_fixtures import example

PLURALS = {("llmops.dev/v1alpha1", "LLMDeployment"): "llmdeployments"}


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def refused_owner_references(
    children: list[dict[str, Any]], rules: list[dict[str, Any]]
) -> list[str]:
    """What OwnerReferencesPermissionEnforcement refuses: an owner reference with
    ``blockOwnerDeletion: true`` from a creator that may not update the owner's ``finalizers``
    subresource (kubernetes plugin/pkg/admission/gc/gc_admission.go, as OpenShift enables it).
    """
    granted = _granted(rules)
    refused = []
    for child in children:
        for owner in child["metadata"].get("ownerReferences", []):
            if not owner.get("blockOwnerDeletion"):
                continue
            group = owner["apiVersion"].rpartition("/")[0]
            plural = PLURALS[(owner["apiVersion"], owner["kind"])]
            if (group, f"{plural}/finalizers", "update") not in granted:
                refused.append(f"{child['kind']}/{child['metadata']['name']}")
    return refused


def _children() -> list[dict[str, Any]]:
    manifest = example("llama-8b-gpu")
    manifest["metadata"]["uid"] = "0b6c3d1e-2f4a-4b5c-8d7e-9f0a1b2c3d4e"
    return render.render(manifest)


@pytest.mark.parametrize("value_set", ["default", "namespaced"])
def test_children_with_block_owner_deletion_are_admitted(value_set: str) -> None:
    children = _children()
    assert any(
        owner.get("blockOwnerDeletion")
        for child in children
        for owner in child["metadata"]["ownerReferences"]
    )
    objs = render_chart(value_sets()[value_set])
    roles = [
        role
        for kind in ("ClusterRole", "Role")
        for role in by_kind(objs, kind)
        if role["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        and any(rule.get("apiGroups") == ["ray.io"] for rule in role["rules"])
    ]
    assert roles
    for role in roles:
        assert refused_owner_references(children, role["rules"]) == [], role["metadata"]


def test_the_check_refuses_without_the_finalizers_grant() -> None:
    rules = [{"apiGroups": ["llmops.dev"], "resources": ["llmdeployments"], "verbs": ["update"]}]
    assert len(refused_owner_references(_children(), rules)) == len(_children())

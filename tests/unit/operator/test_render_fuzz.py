"""Hypothesis mutates the example manifests; the renderer never crashes on what it gets.

Each example in deploy/examples is mutated at random paths (values of every JSON type set,
keys deleted, unknown keys added, lists emptied or grown). For every mutant, exactly one of:
the LLMDeployment CRD's schema rejects it (the API server would never store it), the
renderer raises RenderError (the operator reports Ready=False with the message), or every
object it renders is valid against the official schemas. Any other exception fails.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmops_operator.render import RenderDefaults, RenderError, render
from tests.reliability import Outcome, outcome
from tests.schemas import schema_errors

EXAMPLES = sorted((Path(__file__).parents[3] / "deploy" / "examples").glob("*.yaml"))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "1e9", "auto", "hf://", "embedded://nope", "a" * 300]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside the manifest's spec."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            found.extend(paths(child, (*prefix, key)))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found.extend(paths(child, (*prefix, index)))
    return found


@st.composite
def mutants(draw: st.DrawFn) -> dict[str, Any]:
    manifest = copy.deepcopy(yaml.safe_load(draw(st.sampled_from(EXAMPLES)).read_text()))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not isinstance(manifest.get("spec"), dict):
            break  # the spec itself was replaced or deleted
        path = draw(st.sampled_from(paths(manifest["spec"], ("spec",))))
        parent: Any = manifest
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = draw(st.sampled_from(["set", "delete", "add_key", "duplicate"]))
        if action == "set":
            parent[last] = draw(values)
        elif action == "delete":
            del parent[last]
        elif action == "add_key" and isinstance(parent[last], dict):
            parent[last][draw(st.text(min_size=1, max_size=12))] = draw(values)
        elif action == "duplicate" and isinstance(parent[last], list) and parent[last]:
            parent[last].append(copy.deepcopy(parent[last][0]))
    return manifest


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_render_valid(example: Path) -> None:
    # The starting points must themselves be accepted, or every mutant is trivially rejected.
    manifest = yaml.safe_load(example.read_text())
    assert schema_errors(manifest) == []
    rendered = render(manifest, RenderDefaults())
    assert rendered
    assert [e for obj in rendered for e in schema_errors(obj)] == []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_mutated_manifests_are_rejected_or_render_valid_objects(manifest: dict[str, Any]) -> None:
    result = _counted()
    if schema_errors(manifest):
        event("rejected by the CRD schema")
        result.error("rejected by the CRD schema")
        return  # the API server refuses it before the operator sees it
    rendered: list[dict[str, Any]] = []
    rejection: str | None = None
    try:
        rendered = render(manifest, RenderDefaults())
    except RenderError as exc:
        rejection = str(exc)
    if rejection is not None:
        event("rejected by the renderer")
        result.error("rejected by the renderer (Ready=False)")
        assert rejection.strip(), "a rejection needs a message for the Ready condition"
        return
    event("rendered")
    errors = [e for obj in rendered for e in schema_errors(obj)]
    assert errors == [], yaml.safe_dump(manifest)
    result.ok()


@functools.cache
def _counted() -> Outcome:
    """The one outcome of the fuzz test, made on its first example."""
    return outcome("hypothesis-mutated LLMDeployment manifests through the renderer")

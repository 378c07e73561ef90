"""The contract module: names defined once, and an import graph with it under every deployable.

Two checks over the source tree (AST, so comments and docstrings do not count):

- no module outside `llmops_contract` types out a contract value again: the distinctive ones
  (API group, kind, plural, the ``llm-`` prefix, header names) anywhere as a string literal,
  the common words ("llmops", "router", "encoder", "auto") where a constant of the contract's
  own name is assigned one;
- the gateway, the operator and the serving graph never import one another, the contract
  imports none of them (and nothing beyond pydantic and the standard library); the CLI may
  import them all.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmops_contract
from llmops_contract import names

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "llmops_contract": ROOT / "contract" / "llmops_contract",
    "llmops_cli": ROOT / "cli" / "llmops_cli",
    "llmops_gateway": ROOT / "gateway" / "llmops_gateway",
    "llmops_operator": ROOT / "operator" / "llmops_operator",
    "llmops_services": ROOT / "services" / "llmops_services",
}
DEPLOYABLES = ("llmops_gateway", "llmops_operator", "llmops_services")
# Values unlikely to mean anything else: no string literal may equal one.
DISTINCTIVE = {
    name: getattr(names, name)
    for name in (
        "GROUP",
        "API_VERSION",
        "GRAPH_IMPORT_PATH",
        "KIND",
        "PLURAL",
        "LLM_DEPLOYMENT_PREFIX",
        "REQUEST_ID_HEADER",
        "ROUTED_MODEL_HEADER",
        "MODEL_KIND",
        "MODEL_PLURAL",
        "HELD_REQUESTS_METRIC",
        "TOKENIZER_PATH",
        "SCALED_TO_ZERO_CODE",
    )
}
# Every public constant of the contract: a module constant of the same name set to a literal
# is a copy (APP_NAME = "llmops", ROUTER_DEPLOYMENT = "router", AUTO_MODEL = "auto", ...).
CONSTANTS = {
    name: value
    for name, value in vars(names).items()
    if name.isupper() and isinstance(value, str) and name in llmops_contract.__all__
}


def _sources(package: str) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGES[package].rglob("*.py")):
        if "grpc_api" in path.parts and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue  # generated stubs
        yield path, ast.parse(path.read_text(), filename=str(path))


def copies(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for each contract value ``tree`` types out again."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for name, value in DISTINCTIVE.items():
                if node.value == value:
                    found.append((node.lineno, f"{value!r} is llmops_contract.{name}"))
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        value = getattr(node, "value", None)
        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
            continue
        for target in targets:
            if isinstance(target, ast.Name) and CONSTANTS.get(target.id) == value.value:
                found.append((node.lineno, f"{target.id} = {value.value!r} redefines it"))
    return found


def imported_packages(tree: ast.Module) -> set[str]:
    """Top-level names of every module ``tree`` imports, function-level imports included."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_checks_catch_a_copy_and_a_cross_import() -> None:
    """The checks themselves: a retyped name and a cross import are found."""
    snippet = ast.parse(
        'HEADER = "x-request-id"\n'
        'APP_NAME = "llmops"\n'
        'name = "llm-" + model\n'
        "def f():\n    from llmops_services.config import GraphConfig\n"
    )
    assert sorted(line for line, _ in copies(snippet)) == [1, 2, 3]
    assert "llmops_services" in imported_packages(snippet)


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "llmops_contract"])
def test_no_contract_name_is_typed_out_again(package: str) -> None:
    """Each name two deployables agree on is imported from llmops_contract, never retyped."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path, tree in _sources(package)
        for line, what in copies(tree)
    ]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("package", DEPLOYABLES)
def test_deployables_never_import_one_another(package: str) -> None:
    """The gateway, the operator and the graph share only the contract module."""
    others = set(DEPLOYABLES) - {package}
    found = [
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(imported_packages(tree) & others))}"
        for path, tree in _sources(package)
        if imported_packages(tree) & others
    ]
    assert found == [], "\n".join(found)


def test_contract_stands_alone() -> None:
    """The contract imports no deployable and nothing beyond pydantic: every install has it."""
    allowed = set(sys.stdlib_module_names) | {"pydantic", "llmops_contract"}
    found = [
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(imported_packages(tree) - allowed))}"
        for path, tree in _sources("llmops_contract")
        if imported_packages(tree) - allowed
    ]
    assert found == [], "\n".join(found)


def test_the_graph_import_path_names_the_builder() -> None:
    """serveConfigV2's import_path (what the operator renders) names a function of the graph
    package that takes the graph config."""
    module, _, function = names.GRAPH_IMPORT_PATH.partition(":")
    package, _, name = module.partition(".")
    tree = ast.parse((PACKAGES[package] / f"{name}.py").read_text())
    builders = [
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function
    ]
    assert len(builders) == 1
    assert [arg.arg for arg in builders[0].args.args] == ["args"]

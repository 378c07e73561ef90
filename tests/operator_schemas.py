"""`tests.schemas` for the operator's children, LLMModel included.

`tests.schemas.schema_errors` evaluates the LLMDeployment CRD's CEL rules on every llmops.dev
object; its root rules (a DNS-1035 name of at most 47 characters, KubeRay's RayService limit)
do not apply to an LLMModel, which is named `<deployment>-<model>` (a model name may hold a
dot) and whose CRD has no CEL rules. LLMModels are checked against their own CRD's structural
schema here, everything else as `tests.schemas` checks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmops_contract import API_VERSION, MODEL_KIND
from tests.schemas import custom_validators
from tests.schemas import schema_errors as base_errors


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one rendered object (empty when valid)."""
    if (obj.get("apiVersion"), obj.get("kind")) != (API_VERSION, MODEL_KIND):
        return base_errors(obj)
    validator = custom_validators()[(API_VERSION, MODEL_KIND)]
    where = f"{MODEL_KIND} {obj.get('metadata', {}).get('name')}"
    return [
        f"{where}: {'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def assert_valid(objs: Iterable[dict[str, Any]]) -> None:
    """Fails with every violation of every object."""
    errors = [line for obj in objs for line in schema_errors(obj)]
    assert not errors, "\n".join(errors)

"""Writes the contract's `vllm_engine_args.json`, describing vLLM's engine arguments, from vLLM.

The graph config's ``engine.extra_args`` passes vLLM arguments through, checked against that
description, so `llmops render` and the operator (whose images have no vLLM) refuse an unknown
or mistyped one before any pod starts. Run where the pinned vLLM is installed, after a vLLM
upgrade::

    python -m llmops_services.engine_args

The names are the ones Ray Serve LLM's ``engine_kwargs`` accepts
(``ray/llm/_internal/serve/engines/vllm/vllm_models.py``, ``VLLMEngineConfig.from_llm_config``):
the fields of vLLM's ``AsyncEngineArgs`` (the engine) and of its ``FrontendArgs`` (the OpenAI
serving layer: chat template, tool-call parser...), which Ray hands to vLLM's
``init_app_state``. Types follow how vLLM's own parser reads each field
(``vllm.engine.arg_utils._compute_kwargs``), for values given as Python objects rather than
command-line strings.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

import llmops_contract
from llmops_contract.graph import VLLM_ENGINE_ARGS_FILE

DESCRIPTION_FILE = Path(llmops_contract.__file__).with_name(VLLM_ENGINE_ARGS_FILE)


def _json_types(hint: Any) -> tuple[set[str], list[Any] | None, str | None]:
    """JSON types a Python type hint accepts, its choices (Literals) and its item type."""
    origin = typing.get_origin(hint)
    if hint is type(None):
        return {"null"}, None, None
    if origin is typing.Annotated:
        return _json_types(typing.get_args(hint)[0])
    if origin in {typing.Union, types.UnionType}:
        found: set[str] = set()
        choices: list[Any] | None = None
        items: str | None = None
        strings = str in typing.get_args(hint)
        for arg in typing.get_args(hint):
            kinds, arg_choices, arg_items = _json_types(arg)
            found |= kinds
            items = items or arg_items
            if arg_choices is not None and not strings:
                choices = (choices or []) + arg_choices
        return found, choices, items
    if origin is typing.Literal:
        values = list(typing.get_args(hint))
        kinds = set()
        for value in values:
            kinds |= _json_types(type(value))[0]
        return kinds, values, None
    if origin in {list, set, tuple, frozenset} or hint in {list, set, tuple, frozenset}:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item_kinds = _json_types(args[0])[0] if args else {"any"}
        # list[int | str]: vLLM's parser reads such items as strings.
        item = "any" if len(item_kinds) != 1 else next(iter(item_kinds))
        return {"array"}, None, item
    if origin is dict or (isinstance(hint, type) and issubclass(hint, dict)):
        return {"object"}, None, None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        # A vLLM config class: engine_kwargs carry it as a dict of its fields.
        return {"object"}, None, None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        kinds = {"string"}
        for member in hint:
            kinds |= _json_types(type(member.value))[0]
        return kinds, None, None
    if hint is bool:
        return {"boolean"}, None, None
    if hint is int:
        return {"integer"}, None, None
    if hint is float:
        return {"number"}, None, None
    if hint is str:
        return {"string"}, None, None
    # Classes, callables, torch.dtype: in a config they can only be named by a string.
    return {"string"}, None, None


def _json_default(value: Any) -> tuple[bool, Any]:
    """The default as JSON, or (False, None) when it is no plain value (a config object)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return True, value


def _describe(field: dataclasses.Field[Any], group: str, module_globals: dict[str, Any]) -> Any:
    hint = field.type
    if isinstance(hint, str):
        # A quoted annotation naming a class imported only for type checking: read the
        # builtin parts and take the rest as a config object.
        hint = eval(hint, {**vars(typing), **module_globals}, _ForwardNames())  # noqa: S307
    kinds, choices, items = _json_types(hint)
    entry: dict[str, Any] = {"group": group, "types": sorted(kinds)}
    if choices is not None:
        entry["choices"] = sorted({c for c in choices if c is not None}, key=repr)
    if items is not None:
        entry["items"] = items
    if field.default is not dataclasses.MISSING:
        default: Any = field.default
        if isinstance(default, FieldInfo):
            factory = default.default_factory
            default = factory() if factory is not None else default.default  # type: ignore[call-arg]
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = None
    plain, value = _json_default(default)
    if plain:
        entry["default"] = value
    return entry


@dataclasses.dataclass
class _ConfigClass:
    """Stands for a config class a quoted annotation names but the module never imports."""


class _ForwardNames(dict[str, Any]):
    """Names missing at run time (imported under TYPE_CHECKING) read as a config class."""

    def __missing__(self, key: str) -> Any:
        return getattr(builtins, key, _ConfigClass)


def describe() -> dict[str, Any]:
    """The description of the installed vLLM's engine and frontend arguments."""
    import vllm
    import vllm.engine.arg_utils as arg_utils
    import vllm.entrypoints.launchers.cli_args as cli_args

    args: dict[str, Any] = {}
    for cls, group, module in (
        (arg_utils.AsyncEngineArgs, "engine", arg_utils),
        # Ray Serve LLM tests FrontendArgs first: a name in both goes to the frontend.
        (cli_args.FrontendArgs, "frontend", cli_args),
    ):
        for field in dataclasses.fields(cls):
            if field.name.startswith("_"):
                continue
            args[field.name] = _describe(field, group, vars(module))
    return {
        "vllm_version": vllm.__version__,
        "generated_by": "python -m llmops_services.engine_args",
        "args": dict(sorted(args.items())),
    }


def render() -> str:
    """The description as the committed file's text, from the vLLM imported here."""
    return json.dumps(describe(), indent=1, sort_keys=False) + "\n"


def generate() -> str:
    """The description from a fresh interpreter without ``VLLM_*`` variables.

    Some defaults are read from the environment when vLLM is imported (``log_error_stack``
    from ``VLLM_SERVER_DEV_MODE``): the committed file holds vLLM's own.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    done = subprocess.run(
        [sys.executable, "-m", "llmops_services.engine_args", "--stdout"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    return done.stdout


def main() -> None:
    """Writes the description into the contract package (``--stdout``: prints it)."""
    if sys.argv[1:] == ["--stdout"]:
        sys.stdout.write(render())
        return
    DESCRIPTION_FILE.write_text(generate())
    print(f"wrote {DESCRIPTION_FILE}")


if __name__ == "__main__":
    main()

"""engine.extra_args: vLLM options checked against the committed description, without vLLM.

The operator and gateway images have no vLLM, so these run with vLLM's packages refused, as
in those images (`test_install_extras` does the same for whole modules). What the names and
types are comes from vllm/engine/arg_utils.py (``AsyncEngineArgs``) and
vllm/entrypoints/launchers/cli_args.py (``FrontendArgs``), through the committed file.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from llmops_contract import EngineConfig, GraphConfig
from llmops_contract.graph import check_vllm_arg, vllm_engine_args

ROOT = Path(__file__).resolve().parents[2]


def _refused(extra_args: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        EngineConfig(extra_args=extra_args)
    return str(info.value)


def test_a_misspelled_option_is_named_with_the_nearest_known_name() -> None:
    message = _refused({"max_num_batch_tokens": 8192})
    assert "'max_num_batch_tokens'" in message
    assert "did you mean 'max_num_batched_tokens'?" in message


def test_a_command_line_flag_name_is_refused_with_its_python_name() -> None:
    message = _refused({"--kv-cache-dtype": "fp8"})
    assert "write its Python name 'kv_cache_dtype'" in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_num_batched_tokens", "8k", "takes integer or null, not str '8k'"),
        ("enable_expert_parallel", "yes", "takes boolean"),
        ("kv_cache_dtype", "fp9", "not 'fp9'"),
        ("scheduling_policy", "lifo", "takes one of fcfs, priority"),
        ("cpu_offload_params", ["a", 1], "takes a list of string, not 1"),
        ("compilation_config", "3", "takes object"),
        ("tool_call_parser", 1, "takes null or string"),
    ],
)
def test_a_mistyped_value_is_refused_naming_the_option(
    name: str, value: Any, expected: str
) -> None:
    message = _refused({name: value})
    assert repr(name) in message
    assert expected in message


def test_options_the_typed_fields_or_the_platform_set_are_refused() -> None:
    assert "engine.max_concurrent_sequences" in _refused({"max_num_seqs": 8})
    assert "engine.speculative" in _refused({"speculative_config": {}})
    assert "source" in _refused({"model": "org/other"})
    assert "Ray Serve LLM sets it" in _refused({"distributed_executor_backend": "mp"})


def test_auto_tool_choice_needs_a_parser_as_vllm_serve_requires() -> None:
    assert "needs a tool_call_parser" in _refused({"enable_auto_tool_choice": True})
    config = EngineConfig(extra_args={"enable_auto_tool_choice": True, "tool_call_parser": "x"})
    assert config.to_vllm()["tool_call_parser"] == "x"


def test_a_vllm_option_written_directly_under_engine_points_to_extra_args() -> None:
    with pytest.raises(ValidationError, match=r"go in engine\.extra_args"):
        EngineConfig.model_validate({"kv_cache_dtype": "fp8"})


def test_valid_options_pass_through_to_the_engine_kwargs() -> None:
    extra = {
        "max_num_batched_tokens": 4096,
        "kv_cache_dtype": "fp8",
        "pipeline_parallel_size": 2,
        "reasoning_parser": "deepseek_r1",
        "chat_template": "/templates/chat.jinja",
        "hf_overrides": {"rope_scaling": None},
        "quantization_config": None,
    }
    graph = GraphConfig.model_validate(
        {"llms": [{"name": "m", "source": "hf://org/m", "engine": {"extra_args": extra}}]}
    )
    kwargs = graph.llms[0].engine.to_vllm()
    for name, value in extra.items():
        assert kwargs[name] == value
    assert kwargs["max_num_seqs"] == 64  # typed fields are still there
    for name, value in extra.items():
        assert check_vllm_arg(name, value) is None


def test_the_description_is_read_without_vllm() -> None:
    """As in the operator and gateway images: vLLM (and Ray, torch) cannot be imported."""
    code = textwrap.dedent(
        """
        import sys

        class Forbid:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"vllm", "ray", "torch"}:
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, Forbid())
        from pydantic import ValidationError
        from llmops_contract import EngineConfig
        EngineConfig(extra_args={"max_num_batched_tokens": 8})
        try:
            EngineConfig(extra_args={"max_num_batched_tokenz": 8})
        except ValidationError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "did you mean 'max_num_batched_tokens'" in done.stdout
    assert len(vllm_engine_args()["args"]) > 100

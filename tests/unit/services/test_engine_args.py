"""engine.extra_args against the installed vLLM and Ray Serve LLM, whose code decides.

- The committed description (llmops_contract/vllm_engine_args.json) is what
  `llmops_services.engine_args` makes from the installed vLLM today: it fails when vLLM is
  upgraded and the file is not regenerated.
- Ray Serve LLM splits ``engine_kwargs`` into vLLM's ``AsyncEngineArgs`` and ``FrontendArgs``
  and refuses any other name (ray/llm/_internal/serve/engines/vllm/vllm_models.py,
  ``VLLMEngineConfig.from_llm_config``): every described name passes that split, in the half
  the description says, and a passed-through option lands in the dataclass vLLM builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from llmops_contract.graph import vllm_engine_args
from llmops_services import LLMSpec
from llmops_services.llm import llm_config_for

vllm = pytest.importorskip("vllm")

from llmops_services import engine_args  # noqa: E402  (imports vLLM)

PASSED_THROUGH: dict[str, Any] = {
    "max_num_batched_tokens": 4096,
    "kv_cache_dtype": "auto",
    "scheduling_policy": "priority",
    "pipeline_parallel_size": 1,
    "tool_call_parser": "hermes",
    "enable_auto_tool_choice": True,
    "reasoning_parser": "deepseek_r1",
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
}


def _spec(extra_args: dict[str, Any]) -> LLMSpec:
    return LLMSpec.model_validate(
        {
            "name": "smol",
            "source": "embedded://smollm2-135m-instruct",
            "engine": {"extra_args": extra_args},
        }
    )


def test_the_committed_description_matches_the_installed_vllm() -> None:
    committed = engine_args.DESCRIPTION_FILE.read_text()
    assert committed == engine_args.generate(), (
        "vllm_engine_args.json is stale: run `python -m llmops_services.engine_args`"
    )
    assert vllm_engine_args()["vllm_version"] == vllm.__version__


def test_every_described_name_is_one_ray_serve_llm_passes_to_the_right_half() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    frontend = {f.name for f in dataclasses.fields(FrontendArgs)}
    engine = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    described = vllm_engine_args()["args"]
    for name, arg in described.items():
        expected = "frontend" if name in frontend else "engine" if name in engine else None
        assert arg["group"] == expected, name
    # Every public name of both dataclasses is described.
    assert {n for n in frontend | engine if not n.startswith("_")} == set(described)


def test_passed_through_options_reach_vllms_engine_and_frontend_args() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    config = llm_config_for(_spec(PASSED_THROUGH), "/models/smol")
    for name, value in PASSED_THROUGH.items():
        assert config.engine_kwargs[name] == value, name
    # Ray Serve LLM's own split: the serving layer's options go to FrontendArgs, which it
    # hands to vLLM's init_app_state; the rest build AsyncEngineArgs.
    split = config.get_engine_config()
    assert split.frontend_kwargs == {
        "tool_call_parser": "hermes",
        "enable_auto_tool_choice": True,
        "chat_template": PASSED_THROUGH["chat_template"],
    }
    frontend = FrontendArgs(**split.frontend_kwargs)
    assert frontend.tool_call_parser == "hermes"
    assert frontend.enable_auto_tool_choice is True
    args = AsyncEngineArgs(**split.get_initialization_kwargs())
    assert args.max_num_batched_tokens == 4096
    assert args.scheduling_policy == "priority"
    assert args.reasoning_parser == "deepseek_r1"
    # The typed fields still come through beside them.
    assert args.max_model_len == 2048
    assert args.dtype == "float32"


def test_ray_serve_llm_itself_refuses_the_misspelling_the_contract_refuses() -> None:
    """Without the contract's check the typo would surface only in the replica, at start."""
    spec = _spec({})
    config = llm_config_for(spec, "/models/smol")
    config.engine_kwargs["max_num_batch_tokens"] = 4096
    with pytest.raises(ValueError, match="max_num_batch_tokens"):
        config.get_engine_config()


def test_passed_through_options_land_in_the_config_vllm_builds_its_engine_from() -> None:
    """Ray Serve LLM's own path to the engine (vllm_engine.py, ``_get_vllm_engine_config``):
    AsyncEngineArgs.create_engine_config on the embedded model, no engine started."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import _get_vllm_engine_config

    from llmops_services.sources import resolve_source

    spec = _spec({"max_num_batched_tokens": 4096, "scheduling_policy": "priority"})
    folder = resolve_source(spec.source, None)
    _, config = _get_vllm_engine_config(llm_config_for(spec, str(folder)))
    assert config.scheduler_config.max_num_batched_tokens == 4096
    assert config.scheduler_config.policy == "priority"
    assert config.model_config.max_model_len == 2048

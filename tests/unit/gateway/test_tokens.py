"""Prompt tokens counted with the model's own tokenizer (llmops_gateway.tokens).

Counts are checked against the ``tokenizers`` library on the same tokenizer.json the engine
loads (the embedded SmolLM2's), never against literals. Image sizes are checked against files
Pillow writes; the patch count is Qwen2-VL's (transformers' ``smart_resize``: 28 px per token).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from PIL import Image
from tokenizers import Tokenizer

from llmops_contract import TOKENIZER_PATH
from llmops_gateway.settings import GatewaySettings
from llmops_gateway.tokens import (
    MESSAGE_TOKENS,
    REPLY_TOKENS,
    THREAD_CHARS,
    MediaBudget,
    TokenCounter,
    image_size,
    image_tokens,
    prompt_parts,
)
from tests.fakes.tokenizer_files import smollm2_tokenizer

CJK = "".join(chr(0x4E00 + (i * 37) % 20000) for i in range(1000))
MEDIA = MediaBudget(image=1280, patch_px=28, audio=750, other=4096)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_tokenizer()))


def _encode(tokenizer: Tokenizer, text: str, special: bool = False) -> int:
    return len(tokenizer.encode(text, add_special_tokens=special).ids)


def _data_url(image: Image.Image, fmt: str, **options: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def _noise_png(width: int, height: int) -> str:
    """A PNG of random pixels (incompressible: its base64 is about 4 x w x h bytes)."""
    rng = random.Random(7)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    return _data_url(image, "PNG")


def test_cjk_text_counts_what_the_tokenizer_counts(tokenizer: Tokenizer) -> None:
    """1,000 CJK characters: the estimate said 334; the tokenizer says otherwise."""
    parts = prompt_parts({"messages": [{"role": "user", "content": CJK}]}, MEDIA)
    counted = parts.count(tokenizer)
    assert counted == _encode(tokenizer, CJK) + MESSAGE_TOKENS + REPLY_TOKENS
    assert counted > 2 * parts.estimate  # the len/3 estimate under-counted it


def test_tools_and_response_format_add_their_tokenized_json(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "weather in Paris?"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    plain = prompt_parts({"messages": messages}, MEDIA).count(tokenizer)
    body = {"messages": messages, "tools": tools, "response_format": schema}
    with_schemas = prompt_parts(body, MEDIA).count(tokenizer)
    expected = _encode(tokenizer, json.dumps(tools, ensure_ascii=False)) + _encode(
        tokenizer, json.dumps(schema, ensure_ascii=False)
    )
    assert with_schemas - plain == expected > 0


def test_completion_prompts_count_as_vllm_encodes_them(tokenizer: Tokenizer) -> None:
    """vLLM encodes a completion prompt with special tokens; token ids count their length."""
    assert prompt_parts({"prompt": "Once upon a time"}, MEDIA).count(tokenizer) == _encode(
        tokenizer, "Once upon a time", special=True
    )
    texts = ["a b c", CJK]
    assert prompt_parts({"prompt": texts}, MEDIA).count(tokenizer) == sum(
        _encode(tokenizer, text, special=True) for text in texts
    )
    assert prompt_parts({"prompt": [[1, 2, 3], [4, 5]]}, MEDIA).count(tokenizer) == 5
    assert prompt_parts({"prompt": [9, 9, 9, 9]}, MEDIA).count(tokenizer) == 4


def test_responses_input_counts_its_text_and_instructions(tokenizer: Tokenizer) -> None:
    body = {
        "instructions": "Answer briefly.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": CJK}]},
            {"type": "function_call", "name": "f", "arguments": '{"x": 1}', "call_id": "c"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
        ],
    }
    texts = ["Answer briefly.", CJK, "f", '{"x": 1}', "42"]
    expected = sum(_encode(tokenizer, t) for t in texts) + 4 * MESSAGE_TOKENS + REPLY_TOKENS
    assert prompt_parts(body, MEDIA).count(tokenizer) == expected
    for body in ({"input": CJK, "instructions": None}, {"input": CJK}):
        single = prompt_parts(body, MEDIA).count(tokenizer)
        assert single == _encode(tokenizer, CJK) + MESSAGE_TOKENS + REPLY_TOKENS
    texts = prompt_parts({"input": ["a b", CJK]}, MEDIA).count(tokenizer)  # embeddings
    assert texts == _encode(tokenizer, "a b", special=True) + _encode(tokenizer, CJK, special=True)


def test_batch_encoding_counts_the_same(tokenizer: Tokenizer) -> None:
    """The off-loop path (encode_batch_fast) counts what inline encode counts."""
    body = {"messages": [{"role": "user", "content": CJK}, {"role": "user", "content": "hi"}]}
    parts = prompt_parts(body, MEDIA)
    assert parts.count(tokenizer, batch=True) == parts.count(tokenizer)


@pytest.mark.parametrize(
    ("fmt", "options", "mode"),
    [
        ("PNG", {}, "RGB"),
        ("JPEG", {"quality": 80}, "RGB"),
        ("GIF", {}, "P"),
        ("WEBP", {"quality": 80}, "RGB"),  # lossy: VP8
        ("WEBP", {"lossless": True}, "RGB"),  # VP8L
        ("WEBP", {"quality": 80}, "RGBA"),  # alpha: VP8X
    ],
)
def test_image_size_from_the_header(fmt: str, options: dict[str, object], mode: str) -> None:
    image = Image.new(mode, (333, 217))
    assert image_size(_data_url(image, fmt, **options)) == (333, 217)


def test_jpeg_size_after_an_exif_segment() -> None:
    image = Image.new("RGB", (640, 480))
    exif = Image.Exif()
    exif[0x010E] = "x" * 4000  # ImageDescription: a large APP1 segment before the frame
    assert image_size(_data_url(image, "JPEG", exif=exif)) == (640, 480)


def test_unreadable_images_have_no_size() -> None:
    assert image_size("https://example.com/cat.png") is None
    assert image_size("data:image/png;base64,!!!!") is None
    bitmap = base64.b64encode(b"BM" + bytes(64)).decode()
    assert image_size("data:image/bmp;base64," + bitmap) is None


def test_a_300_kb_image_counts_its_patches_not_its_base64(tokenizer: Tokenizer) -> None:
    """The estimate counted a 300 KB base64 PNG as ~100k tokens; the engine counts patches."""
    url = _noise_png(280, 280)
    assert len(url) > 300_000
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    parts = prompt_parts({"messages": [{"role": "user", "content": content}]}, MEDIA)
    image = image_tokens(280, 280, 28, MEDIA.image)
    assert image == (280 // 28) ** 2 + 2
    text = _encode(tokenizer, "what is this?")
    assert parts.count(tokenizer) == text + image + MESSAGE_TOKENS + REPLY_TOKENS
    # Without a tokenizer the fallback estimate also counts the image by its budget.
    assert parts.estimate < 2 * MEDIA.image


def test_images_without_a_size_count_the_budget_and_big_ones_are_capped() -> None:
    remote = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 100_000, "format": "wav"}}
    video = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}
    parts = prompt_parts({"messages": [{"role": "user", "content": [remote, audio, video]}]}, MEDIA)
    assert parts.fixed == MEDIA.image + MEDIA.audio + MEDIA.other + MESSAGE_TOKENS + REPLY_TOKENS
    assert image_tokens(8000, 8000, 28, MEDIA.image) == MEDIA.image
    fixed = MediaBudget(image=576, patch_px=None, audio=1, other=1)
    inline = {"type": "image_url", "image_url": {"url": _noise_png(56, 56)}}
    assert fixed.part("image", inline) == 576


# -- fetching ---------------------------------------------------------------------------------


@dataclass
class TokenizerServer:
    """A backend serving one tokenizer.json for model ``m`` (404 for others, 500 for ``bad``)."""

    url: str = ""
    fetches: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0


@pytest.fixture
async def server() -> AsyncIterator[TokenizerServer]:
    state = TokenizerServer()
    path = smollm2_tokenizer()

    async def tokenizer_json(request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        state.fetches[model] = state.fetches.get(model, 0) + 1
        await asyncio.sleep(state.delay_s)
        if model == "bad":
            return web.Response(status=500, text="boom")
        if model != "m":
            return web.json_response({"error": {"message": "no tokenizer"}}, status=404)
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get(TOKENIZER_PATH, tokenizer_json)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def _counter(**settings: object) -> TokenCounter:
    return TokenCounter(GatewaySettings(**settings))  # type: ignore[arg-type]


CHAT = {"messages": [{"role": "user", "content": CJK}]}


async def test_one_fetch_for_many_concurrent_requests(
    server: TokenizerServer, tokenizer: Tokenizer
) -> None:
    counter = _counter(tokenizer_wait_s=10)
    expected = prompt_parts(CHAT, counter.media).count(tokenizer)
    async with aiohttp.ClientSession() as session:
        counts = await asyncio.gather(
            *(counter.count(session, server.url, "m", CHAT) for _ in range(50))
        )
        again = await counter.count(session, server.url, "m", CHAT)
    await counter.close()
    assert server.fetches == {"m": 1}
    assert set(counts) == {expected}
    assert again == expected


async def test_a_backend_without_the_tokenizer_is_estimated_and_not_asked_again(
    server: TokenizerServer,
) -> None:
    counter = _counter(tokenizer_retry_s=60)
    estimate = prompt_parts(CHAT, counter.media).estimate
    async with aiohttp.ClientSession() as session:
        first = await counter.count(session, server.url, "other", CHAT)
        second = await counter.count(session, server.url, "other", CHAT)
    await counter.close()
    assert first == second == estimate
    assert server.fetches == {"other": 1}


async def test_a_failed_fetch_is_retried_only_after_the_back_off(server: TokenizerServer) -> None:
    counter = _counter(tokenizer_retry_s=0.3)
    estimate = prompt_parts(CHAT, counter.media).estimate
    async with aiohttp.ClientSession() as session:
        assert await counter.count(session, server.url, "bad", CHAT) == estimate
        assert await counter.count(session, server.url, "bad", CHAT) == estimate
        assert server.fetches == {"bad": 1}
        await asyncio.sleep(0.4)
        assert await counter.count(session, server.url, "bad", CHAT) == estimate
    await counter.close()
    assert server.fetches == {"bad": 2}


async def test_a_slow_fetch_does_not_hold_requests(
    server: TokenizerServer, tokenizer: Tokenizer
) -> None:
    """Requests wait at most tokenizer_wait_s; the fetch finishes in the background."""
    server.delay_s = 1.5
    counter = _counter(tokenizer_wait_s=0.2)
    parts = prompt_parts(CHAT, counter.media)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        assert await counter.count(session, server.url, "m", CHAT) == parts.estimate
        assert time.monotonic() - started < 1.0
        deadline = time.monotonic() + 20
        while await counter.count(session, server.url, "m", CHAT) != parts.count(tokenizer):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    await counter.close()
    assert server.fetches == {"m": 1}


async def test_the_cache_is_bounded(server: TokenizerServer) -> None:
    counter = _counter(tokenizer_cache_size=2)
    async with aiohttp.ClientSession() as session:
        for model in ("a", "b", "c", "a"):
            await counter.count(session, server.url, model, CHAT)
    await counter.close()
    assert len(counter._cache) == 2
    assert server.fetches == {"a": 2, "b": 1, "c": 1}  # "a" was evicted, then asked again


async def test_a_large_prompt_does_not_block_the_event_loop(
    server: TokenizerServer, tokenizer: Tokenizer
) -> None:
    """A big prompt is encoded off the loop: the loop keeps running meanwhile."""
    text = "hello world 汉字 " * 40_000
    assert len(text) > THREAD_CHARS
    started = time.monotonic()
    inline = _encode(tokenizer, text)
    blocking_s = time.monotonic() - started  # what an inline encode holds the loop for
    counter = _counter(tokenizer_wait_s=10)
    body = {"messages": [{"role": "user", "content": text}]}
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with aiohttp.ClientSession() as session:
        await counter.count(session, server.url, "m", CHAT)  # fetched and parsed first
        ticker = asyncio.create_task(tick())
        counted = await counter.count(session, server.url, "m", body)
        done.set()
        await ticker
    await counter.close()
    assert counted == inline + MESSAGE_TOKENS + REPLY_TOKENS
    assert max(gaps) < blocking_s / 2, (max(gaps), blocking_s)


async def test_counting_off_estimates_without_fetching(server: TokenizerServer) -> None:
    counter = _counter(tokenizer_counting=False)
    async with aiohttp.ClientSession() as session:
        counted = await counter.count(session, server.url, "m", CHAT)
    assert counted == prompt_parts(CHAT, counter.media).estimate
    assert server.fetches == {}

"""Prompt tokens counted with each model's own tokenizer, for reservations.

The gateway reserves a request's prompt tokens before the engine has seen it. A length rule
(about 3 characters a token) over-counts base64 media by orders of magnitude and under-counts
CJK text three-fold; this module counts what the engine will count instead:

- text (message content, completion prompts, Responses input, tool definitions and
  ``response_format`` schemas as JSON) is encoded with the model's ``tokenizer.json``, the file
  the engine loads, fetched once per (backend, model) from the graph's router at
  `llmops_contract.TOKENIZER_PATH` and parsed by the ``tokenizers`` library (Rust, no torch);
- token-id prompts count their length;
- each chat message adds `MESSAGE_TOKENS` for its chat-template markers, and the reply's opening
  `REPLY_TOKENS` (the chat template itself lives in tokenizer_config.json, which the router does
  not serve, so it is not rendered here);
- image, audio, video and file parts count per-part budgets from the settings, never their
  base64 length; an inline PNG, JPEG, GIF or WebP image counts its size in patches
  (`image_tokens`).

Without a tokenizer (the backend answers 404, the fetch failed and waits out its back-off, or
it is still running after ``tokenizer_wait_s``) the prompt is estimated as before, media parts
at their budgets. Settlement replaces either count with the engine's usage.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from tokenizers import Tokenizer

from llmops_contract import TOKENIZER_PATH
from llmops_gateway.settings import GatewaySettings

logger = logging.getLogger("llmops.gateway.tokens")

MESSAGE_TOKENS = 5
"""Template tokens around one chat message's text. ChatML (SmolLM2, Qwen:
``<|im_start|>{role}\\n`` ... ``<|im_end|>\\n``) and Llama 3 (``<|start_header_id|>{role}
<|end_header_id|>\\n\\n`` ... ``<|eot_id|>``) both take 5, from their ``chat_template`` in
tokenizer_config.json. A template's default system prompt (SmolLM2's and Qwen's add one when
the conversation has none) is not counted: settlement charges it."""
REPLY_TOKENS = 4
"""The generation prompt that opens the assistant's reply, with the BOS a template writes:
ChatML's ``<|im_start|>assistant\\n`` is 3, Llama 3's ``<|begin_of_text|>`` plus
``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` is 5; 4 is within one of either."""
IMAGE_WRAP_TOKENS = 2
"""Tokens around an image's patches (Qwen2-VL's ``<|vision_start|>`` and ``<|vision_end|>``)."""
THREAD_CHARS = 16_384
"""Prompts with more text than this are encoded in a worker thread with ``encode_batch_fast``,
which releases the GIL while it runs (``encode`` holds it: in a thread it would still stall the
event loop for the whole encode). Short prompts encode inline, cheaper than a thread hop."""
MAX_TOKENIZER_BYTES = 64 << 20
"""A tokenizer.json larger than this is refused (the largest common ones are about 20 MB)."""
FETCH_TIMEOUT_S = 30.0
"""Longest one tokenizer download may take; requests stop waiting for it much sooner."""
HEADER_BASE64_CHARS = 87_384
"""Base64 characters decoded to find an inline image's size (64 KiB: a JPEG's frame header
follows its EXIF and ICC segments, which fit in that in practice)."""
MEDIA_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "audio": "audio",
    "video_url": "other",
    "video": "other",
    "file": "other",
    "input_file": "other",
}
"""Content part types of the OpenAI chat and Responses APIs (and vLLM's extensions) that are
media, by budget."""
TEXT_PARTS = ("text", "input_text", "output_text", "refusal", "summary_text", "reasoning_text")


@dataclass(frozen=True)
class MediaBudget:
    """What one media part of a prompt counts, from the settings.

    Attributes:
        image: Tokens of an image whose size cannot be read, and the most any image counts.
        patch_px: Side of the square of pixels one image token covers (None: every image
            counts ``image``).
        audio: Tokens of one audio part.
        other: Tokens of one video or file part, or a part of a type the gateway does not know.
    """

    image: int
    patch_px: int | None
    audio: int
    other: int

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> MediaBudget:
        """The budgets the settings name."""
        return cls(
            settings.image_part_tokens,
            settings.image_patch_px,
            settings.audio_part_tokens,
            settings.other_part_tokens,
        )

    def part(self, kind: str, part: dict[str, Any]) -> int:
        """Tokens of one media part of ``kind`` (image, audio or other)."""
        if kind == "audio":
            return self.audio
        if kind != "image":
            return self.other
        size = None if self.patch_px is None else image_size(_image_url(part))
        if size is None or self.patch_px is None:
            return self.image
        return image_tokens(*size, self.patch_px, self.image)


def image_tokens(width: int, height: int, patch_px: int, most: int) -> int:
    """Tokens of a ``width`` x ``height`` image for an encoder of ``patch_px`` patches.

    Qwen2-VL and Qwen2.5-VL resize an image to multiples of 28 px (14 px patches merged 2 x 2),
    shrinking it to fit ``max_pixels`` (transformers' ``smart_resize``), and give each 28 px
    square one token between two markers: ``round(w/28) * round(h/28) + 2``, the reservation
    capped at ``most``. Encoders with a fixed count per image (LLaVA-1.5 576, Gemma 3 256) take
    a null ``patch_px`` and the budget alone.
    """
    grid = max(1, round(width / patch_px)) * max(1, round(height / patch_px))
    return min(most, grid + IMAGE_WRAP_TOKENS)


def _image_url(part: dict[str, Any]) -> str:
    """The URL of an image part: chat's ``image_url.url``, the Responses API's ``image_url``."""
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else ""


def image_size(url: str) -> tuple[int, int] | None:
    """Width and height of an inline (``data:...;base64,``) PNG, JPEG, GIF or WebP image.

    Only the header is decoded; None for a remote URL, another format or a damaged header.
    """
    if not url.startswith("data:"):
        return None
    _, comma, payload = url.partition(",")
    if not comma:
        return None
    head = payload[:HEADER_BASE64_CHARS]
    head = head[: len(head) - len(head) % 4]
    try:
        data = binascii.a2b_base64(head)
    except (binascii.Error, ValueError):
        return None
    return _header_size(data)


def _header_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: the key frame's header
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        return width, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and data[20:21] == b"\x2f":  # lossless: 14-bit sizes less one
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit canvas sizes less one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # no length
            at += 2
            continue
        if marker in _JPEG_FRAMES:
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            return int.from_bytes(data[at + 7 : at + 9], "big"), height
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


@dataclass
class PromptParts:
    """A request's prompt, split into what the tokenizer encodes and what counts by itself.

    Attributes:
        texts: Encoded without special tokens (chat-template pieces, schemas).
        prompts: Encoded with the tokenizer's special tokens (a BOS where it adds one), as
            vLLM encodes a completion prompt or an embedding input.
        fixed: Token ids, template overheads and media budgets.
        estimate: The fallback without a tokenizer: about 3 characters a token, media at
            their budgets (text-only prompts count as the gateway always estimated them).
    """

    texts: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    fixed: int = 0
    estimate: int = 0

    @property
    def chars(self) -> int:
        """Characters to encode."""
        return sum(map(len, self.texts)) + sum(map(len, self.prompts))

    def count(self, tokenizer: Tokenizer, batch: bool = False) -> int:
        """The prompt's tokens with ``tokenizer``.

        Args:
            tokenizer: The model's tokenizer.
            batch: Encode in batches, releasing the GIL (from a worker thread).
        """
        total = self.fixed
        for texts, special in ((self.texts, False), (self.prompts, True)):
            if batch or len(texts) > 8:  # one call for many pieces, spread on Rust threads
                encoded = tokenizer.encode_batch_fast(texts, add_special_tokens=special)
                total += sum(len(item.ids) for item in encoded)
            else:
                total += sum(len(tokenizer.encode(t, add_special_tokens=special)) for t in texts)
        return total


def prompt_parts(data: dict[str, Any], media: MediaBudget) -> PromptParts:
    """Splits a chat, completion, Responses or embeddings request body's prompt.

    The shape says which: ``messages`` (chat), ``prompt`` (completions), ``input`` as one
    text or with items (Responses: rendered with the chat template), or as a list of texts or
    token ids (embeddings).
    """
    parts = PromptParts()
    if "messages" in data:
        messages = data["messages"] if isinstance(data["messages"], list) else []
        parts.estimate = _estimate(messages, media)
        for message in messages:
            if isinstance(message, dict):
                _message(message, parts, media)
        parts.fixed += REPLY_TOKENS
    elif "prompt" in data:
        parts.estimate = _estimate(data["prompt"], media)
        _prompts(data["prompt"], parts)
    elif _responses(data):
        instructions = data.get("instructions")
        parts.estimate = _estimate([instructions or "", data["input"]], media)
        if isinstance(instructions, str) and instructions:
            _message({"content": instructions}, parts, media)
        items = data["input"]
        for item in [{"content": items}] if isinstance(items, str) else items:
            if isinstance(item, dict):
                _item(item, parts, media)
        parts.fixed += REPLY_TOKENS
        text = data.get("text")
        if isinstance(text, dict) and text.get("format") is not None:
            _schema(text["format"], parts)
    else:
        parts.estimate = _estimate(data.get("input"), media)
        _prompts(data.get("input"), parts)
    for name in ("tools", "functions", "response_format"):
        if data.get(name) is not None:
            _schema(data[name], parts)
    return parts


def _responses(data: dict[str, Any]) -> bool:
    """A Responses API body: one input text, instructions, or input items (dicts). An
    embeddings body with one text is taken for one too: a few template tokens too many."""
    items = data.get("input")
    if isinstance(items, str) or ("instructions" in data and isinstance(items, list)):
        return True
    return isinstance(items, list) and any(isinstance(item, dict) for item in items)


def _schema(value: Any, parts: PromptParts) -> None:
    """Tool definitions or an output schema: their JSON, tokenized (templates render tools
    as JSON; a structured-output schema only bounds the reservation, the engine charges it
    if its template writes it)."""
    text = json.dumps(value, ensure_ascii=False)
    parts.texts.append(text)
    parts.estimate += len(text) // 3 + 1


def _prompts(value: Any, parts: PromptParts) -> None:
    """A completion prompt or embedding input: text(s) or token ids."""
    if isinstance(value, str):
        parts.prompts.append(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                parts.prompts.append(item)
            elif isinstance(item, int):
                parts.fixed += 1
            elif isinstance(item, list):
                parts.fixed += len(item)


def _message(message: dict[str, Any], parts: PromptParts, media: MediaBudget) -> None:
    """One chat message: its template markers, text, media and tool calls."""
    parts.fixed += MESSAGE_TOKENS
    _content(message.get("content"), parts, media)
    if isinstance(message.get("name"), str):
        parts.texts.append(message["name"])
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts.texts.append(str(function.get("name") or ""))
            arguments = function.get("arguments")
            parts.texts.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str):
        parts.texts.append(reasoning)


def _item(item: dict[str, Any], parts: PromptParts, media: MediaBudget) -> None:
    """One Responses API input item: a message, a function call or its output."""
    kind = item.get("type")
    if kind == "function_call":
        parts.fixed += MESSAGE_TOKENS
        parts.texts += [str(item.get("name") or ""), str(item.get("arguments") or "")]
    elif kind == "function_call_output":
        parts.fixed += MESSAGE_TOKENS
        output = item.get("output")
        parts.texts.append(output if isinstance(output, str) else json.dumps(output))
    elif kind in TEXT_PARTS or kind in MEDIA_PARTS:
        parts.fixed += MESSAGE_TOKENS
        _content([item], parts, media)
    else:  # a message (type "message" or none), or an item with text to count
        _message(item, parts, media)


def _content(content: Any, parts: PromptParts, media: MediaBudget) -> None:
    """Message content: text, or a list of text and media parts."""
    if isinstance(content, str):
        parts.texts.append(content)
        return
    if not isinstance(content, list):
        return
    for part in content:
        if isinstance(part, str):
            parts.texts.append(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = str(part.get("type") or "")
        if kind in TEXT_PARTS or (not kind and isinstance(part.get("text"), str)):
            parts.texts.append(str(part.get("text") or ""))
        else:
            parts.fixed += media.part(MEDIA_PARTS.get(kind, "other"), part)


def _estimate(value: Any, media: MediaBudget) -> int:
    """The gateway's length estimate (about 3 characters a token; core.estimate_tokens), with
    media parts at their budgets instead of their base64 length."""
    if isinstance(value, str):
        return len(value) // 3 + 1
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_estimate(item, media) for item in value) + 1
    if isinstance(value, dict):
        kind = value.get("type")
        if isinstance(kind, str) and kind in MEDIA_PARTS:
            return media.part(MEDIA_PARTS[kind], value)
        return sum(_estimate(v, media) for v in value.values()) + 4
    return 0


@dataclass
class _Entry:
    """A cached tokenizer, or why there is none and when to ask again."""

    tokenizer: Tokenizer | None
    retry_at: float = 0.0


class TokenCounter:
    """Counts prompt tokens with each model's tokenizer, fetched once from its backend.

    A request never waits more than ``tokenizer_wait_s`` for a fetch: concurrent requests of a
    model share one fetch, and those that stop waiting are estimated while it goes on in the
    background. Waiting a little (rather than never) gives a model's first requests their true
    count in the usual case (a local router serves a few MB in well under a second), so a
    fresh gateway does not refuse an image prompt the estimate would over-count. A 404 (a
    backend that is not an llmops graph, or a model without tokenizer.json) or a failure is
    remembered for ``tokenizer_retry_s``: no request waits on that backend again until then.

    Args:
        settings: Process settings (``tokenizer_*`` and the media part budgets).
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.enabled = settings.tokenizer_counting
        self.wait_s = settings.tokenizer_wait_s
        self.retry_s = settings.tokenizer_retry_s
        self.size = settings.tokenizer_cache_size
        self.media = MediaBudget.from_settings(settings)
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._fetches: dict[tuple[str, str], asyncio.Task[Tokenizer | None]] = {}

    async def count(
        self,
        session: aiohttp.ClientSession | None,
        backend: str | None,
        model: str,
        data: dict[str, Any],
    ) -> int:
        """The prompt tokens of request body ``data`` for ``model`` served by ``backend``.

        Args:
            session: The upstream pool, for the tokenizer's fetch (None: estimate only).
            backend: The backend's base URL (None: estimate; the model is refused later).
            model: The model name.
            data: A chat, completion, Responses or embeddings request body.
        """
        parts = prompt_parts(data, self.media)
        tokenizer = None
        if self.enabled and session is not None and backend is not None:
            tokenizer = await self.tokenizer(session, backend, model)
        if tokenizer is None:
            return parts.estimate
        if parts.chars > THREAD_CHARS:
            return await asyncio.to_thread(parts.count, tokenizer, True)
        return parts.count(tokenizer)

    async def tokenizer(
        self, session: aiohttp.ClientSession, backend: str, model: str
    ) -> Tokenizer | None:
        """The model's tokenizer; None while it is fetched, or when there is none."""
        key = (backend, model)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            if entry.tokenizer is not None or time.monotonic() < entry.retry_at:
                return entry.tokenizer
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(session, key))
            self._fetches[key] = task
            task.add_done_callback(lambda _: self._fetches.pop(key, None))
        if self.wait_s <= 0:
            return None
        done, _ = await asyncio.wait({task}, timeout=self.wait_s)
        return task.result() if done else None

    async def _fetch(
        self, session: aiohttp.ClientSession, key: tuple[str, str]
    ) -> Tokenizer | None:
        """Downloads and parses one tokenizer.json, caching the outcome; never raises."""
        backend, model = key
        url = backend + TOKENIZER_PATH.format(model=quote(model, safe=""))
        tokenizer: Tokenizer | None = None
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
            ) as response:
                if response.status == 404:
                    logger.info("no tokenizer for %s at %s: estimating its prompts", model, url)
                elif response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                elif (response.content_length or 0) > MAX_TOKENIZER_BYTES:
                    raise ValueError(f"{response.content_length} bytes is too large")
                else:
                    payload = await response.read()
                    tokenizer = await asyncio.to_thread(Tokenizer.from_str, payload.decode())
        except Exception as exc:  # any failure (network, HTTP, a malformed file): back off
            logger.warning(
                "cannot fetch the tokenizer of %s from %s (%s: %s); estimating its prompts "
                "for %.0f s",
                model,
                url,
                type(exc).__name__,
                exc,
                self.retry_s,
            )
        self._cache[key] = _Entry(tokenizer, time.monotonic() + self.retry_s)
        self._cache.move_to_end(key)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return tokenizer

    async def close(self) -> None:
        """Stops fetches still running."""
        tasks = list(self._fetches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = [
    "MESSAGE_TOKENS",
    "REPLY_TOKENS",
    "MediaBudget",
    "PromptParts",
    "TokenCounter",
    "image_size",
    "image_tokens",
    "prompt_parts",
]

"""The encoder: sentence embeddings for /v1/embeddings and for semantic routing.

`TextEncoder` is the model: transformers' ``AutoModel`` over the model folder, pooled and
normalised as the folder's sentence-transformers modules declare (`read_pooling`).
`EncoderDeployment` wraps it in a Serve deployment whose adaptive batching pools single texts
from concurrent requests into one forward pass, up to ``max_batch_size`` or
``batch_wait_timeout_s``, whichever comes first.

Why this encoder and not vLLM's pooling runner (measured side by side in docs/benchmarks.md,
"Semantic `auto` routing"): on the same model folder vLLM gives the same vectors, but its
engine (an EngineCore process beside the caller, vLLM's imports and model runner) takes several
times longer to its first vector and about four times the memory, for a model of tens of MB
that runs on the graph's head beside the router. What vLLM would bring is pooling read from the
model's configuration; `read_pooling` reads the same files vLLM reads (``modules.json`` and the
Pooling module's ``config.json``), with every sentence-transformers pooling mode. A model whose
modules need more than Transformer -> Pooling -> Normalize (a Dense projection, for example)
is refused at load, never served with wrong vectors.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from llmops_services.config import EncoderSpec
from llmops_services.metrics import EncoderMetrics
from llmops_services.sources import resolve_source

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
"""sentence-transformers' pooling modes, in the order its Pooling module concatenates them
(sentence_transformers/sentence_transformer/models/Pooling.py)."""
_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_OTHER_POOLING_KEYS = {"word_embedding_dimension", "include_prompt", "pooling_mode"}
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


class EncoderConfigError(ValueError):
    """A model folder whose declared pooling this encoder cannot reproduce."""


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector, as the model folder declares it."""

    modes: tuple[str, ...]
    """Pooling modes, concatenated in `POOLING_MODES` order (usually exactly one)."""
    normalize: bool
    """L2-normalise the pooled vector (a sentence-transformers Normalize module)."""
    transformer_path: str = ""
    """The Transformer module's folder, relative to the model folder."""


def read_pooling(folder: Path) -> Pooling:
    """Reads the pooling a sentence-transformers model folder declares.

    ``modules.json`` lists the modules (Transformer, Pooling, Normalize); the Pooling module's
    ``config.json`` holds the ``pooling_mode_*`` flags (or one ``pooling_mode`` string) as
    sentence-transformers' Pooling module reads them, a missing flag taking that module's
    default (mean on, the rest off). A folder without ``modules.json`` is a plain transformers
    model: mean pooling, normalised, what this encoder has always done for one.

    Raises:
        EncoderConfigError: an unknown pooling mode or key, no mode set, or a module other than
            Transformer, Pooling and Normalize.
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling(("mean",), normalize=True)
    modules: list[dict[str, Any]] = json.loads(modules_file.read_text())
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
    unsupported = [
        str(m.get("type"))
        for m in modules
        if str(m.get("type", "")).rsplit(".", 1)[-1] not in _SUPPORTED_MODULES
    ]
    if unsupported:
        raise EncoderConfigError(
            f"{modules_file}: module {unsupported[0]} is not supported by the encoder "
            f"(it runs {' -> '.join(_SUPPORTED_MODULES)} only); its vectors would be wrong"
        )
    if "Pooling" not in kinds:
        raise EncoderConfigError(f"{modules_file} lists no Pooling module")
    config_file = folder / kinds["Pooling"] / "config.json"
    settings: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return Pooling(
        _pooling_modes(settings, config_file),
        normalize="Normalize" in kinds,
        transformer_path=kinds.get("Transformer", ""),
    )


def _pooling_modes(settings: dict[str, Any], source: Path) -> tuple[str, ...]:
    unknown = sorted(set(settings) - set(_MODE_KEYS) - _OTHER_POOLING_KEYS)
    if unknown:
        raise EncoderConfigError(
            f"{source}: unknown pooling setting {unknown[0]!r}; the encoder knows "
            f"{', '.join(sorted(_MODE_KEYS))} (sentence-transformers' Pooling module)"
        )
    named = settings.get("pooling_mode")
    if named is not None:
        mode = str(named).lower()
        if mode not in POOLING_MODES:
            raise EncoderConfigError(
                f"{source}: unknown pooling_mode {named!r}; known: {', '.join(POOLING_MODES)}"
            )
        return (mode,)
    enabled = {
        mode
        for key, mode in _MODE_KEYS.items()
        if settings.get(key, key == "pooling_mode_mean_tokens")
    }
    if not enabled:
        raise EncoderConfigError(f"{source}: no pooling mode is set")
    return tuple(mode for mode in POOLING_MODES if mode in enabled)


def pool(hidden: Any, mask: Any, modes: tuple[str, ...]) -> Any:
    """Pools token states into one vector per text, as sentence-transformers' Pooling does.

    Args:
        hidden: Token states, ``(batch, tokens, width)``.
        mask: The attention mask, ``(batch, tokens)``; padding may be on either side.
        modes: Pooling modes in `POOLING_MODES` order; their vectors are concatenated.

    Returns:
        ``(batch, width * len(modes))``.
    """
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    vectors = []
    for mode in modes:
        if mode == "cls":
            vectors.append(hidden[:, 0])
        elif mode == "max":
            vectors.append(hidden.masked_fill(weights == 0, -1e9).max(dim=1).values)
        elif mode == "mean":
            vectors.append((hidden * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            vectors.append((hidden * weights).sum(dim=1) / counts.sqrt())
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
            weighted = weights * positions.to(hidden.dtype).view(1, -1, 1)
            vectors.append((hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            # The last position the mask marks, whichever side the tokenizer pads on.
            tokens = mask.shape[1]
            last = tokens - 1 - mask.flip(1).to(torch.int64).argmax(dim=1)
            vectors.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise EncoderConfigError(f"unknown pooling mode {mode!r}")
    return torch.cat(vectors, dim=1)


class TextEncoder:
    """A sentence-embedding model loaded from a local folder.

    Args:
        folder: A sentence-transformers style model folder (or a plain transformers one).
        device: ``cpu``, ``cuda`` or ``auto``.
        max_input_tokens: Inputs are truncated to this many tokens.

    Raises:
        EncoderConfigError: the folder declares pooling this encoder cannot reproduce.
    """

    def __init__(self, folder: Path, device: str = "auto", max_input_tokens: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.pooling = read_pooling(folder)
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.max_input_tokens = max_input_tokens
        weights = folder / self.pooling.transformer_path
        self.tokenizer = AutoTokenizer.from_pretrained(str(weights))
        self.model = AutoModel.from_pretrained(str(weights)).to(device).eval()
        self.dimensions = int(self.model.config.hidden_size) * len(self.pooling.modes)

    def encode(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Embeds texts in one forward pass.

        Returns:
            One vector per text (unit length when the model declares Normalize), and each
            text's token count (after truncation).
        """
        torch = self._torch
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_input_tokens,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            vectors = pool(hidden, batch["attention_mask"], self.pooling.modes)
            if self.pooling.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        counts = [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
        return vectors.float().cpu().tolist(), counts


class EncoderDeployment:
    """The encoder as a Serve deployment class, with adaptive batching.

    Args:
        spec: An `EncoderSpec` as a dict (what serveConfigV2 carries).
        cache_dir: The model cache folder, or None for the default.
    """

    def __init__(self, spec: dict[str, Any], cache_dir: str | None = None) -> None:
        self.spec = EncoderSpec.model_validate(spec)
        folder = resolve_source(self.spec.source, Path(cache_dir) if cache_dir else None)
        self.encoder = TextEncoder(folder, self.spec.device, self.spec.max_input_tokens)
        self._embed_batch.set_max_batch_size(self.spec.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.metrics = EncoderMetrics()

    # The limits here are placeholders: __init__ sets the configured ones.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # type: ignore[untyped-decorator]
    async def _embed_batch(self, texts: list[str]) -> list[tuple[list[float], int]]:
        started = time.perf_counter()
        vectors, counts = await asyncio.to_thread(self.encoder.encode, texts)
        self.metrics.batch(len(texts), time.perf_counter() - started, sum(counts))
        return list(zip(vectors, counts, strict=True))

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Embeds texts, each pooled with texts of concurrent requests.

        Returns:
            The vectors in input order, and the total number of input tokens.
        """
        results = await asyncio.gather(*(self._embed_batch(text) for text in texts))
        return [vector for vector, _ in results], sum(count for _, count in results)

    def dimensions(self) -> int:
        """The embedding width."""
        return self.encoder.dimensions

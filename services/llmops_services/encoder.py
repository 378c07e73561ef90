"""The encoder: sentence embeddings for /v1/embeddings and for semantic routing.

`TextEncoder` is the model (transformers, mean pooling as sentence-transformers configures
it, L2-normalised); `EncoderDeployment` wraps it in a Serve deployment whose adaptive batching
pools single texts from concurrent requests into one forward pass, up to ``max_batch_size`` or
``batch_wait_timeout_s``, whichever comes first.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from ray import serve

from llmops_services.config import EncoderSpec
from llmops_services.metrics import EncoderMetrics
from llmops_services.sources import resolve_source


class TextEncoder:
    """A sentence-embedding model loaded from a local folder.

    Args:
        folder: A sentence-transformers style model folder.
        device: ``cpu``, ``cuda`` or ``auto``.
        max_input_tokens: Inputs are truncated to this many tokens.
    """

    def __init__(self, folder: Path, device: str = "auto", max_input_tokens: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.max_input_tokens = max_input_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(device).eval()
        self.pooling = _pooling_mode(folder)
        self.dimensions = int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Embeds texts in one forward pass.

        Returns:
            One unit-length vector per text, and each text's token count (after truncation).
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
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
        counts = [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
        return vectors.float().cpu().tolist(), counts


def _pooling_mode(folder: Path) -> str:
    config = folder / "1_Pooling" / "config.json"
    if config.is_file():
        settings: dict[str, Any] = json.loads(config.read_text())
        if settings.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


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

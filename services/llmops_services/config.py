"""The serving graph's configuration, as the graph's modules import it.

The models are defined once in `llmops_contract.graph`, which the operator renders from as
well; this module only re-exports them.
"""

from __future__ import annotations

from llmops_contract import AUTO_MODEL
from llmops_contract.graph import (
    DEFAULT_ENCODER_NAME,
    DEFAULT_LLM_NAME,
    NAME_PATTERN,
    EncoderSpec,
    EngineConfig,
    GraphConfig,
    LLMSpec,
    ReplicaResources,
    RouterSpec,
    SpeculativeConfig,
    StrictModel,
    default_graph_config,
)

__all__ = [
    "AUTO_MODEL",
    "DEFAULT_ENCODER_NAME",
    "DEFAULT_LLM_NAME",
    "NAME_PATTERN",
    "EncoderSpec",
    "EngineConfig",
    "GraphConfig",
    "LLMSpec",
    "ReplicaResources",
    "RouterSpec",
    "SpeculativeConfig",
    "StrictModel",
    "default_graph_config",
]

"""The llmops serving graph: router, encoder and vLLM deployments on Ray Serve."""

from llmops_services.config import (
    AUTO_MODEL,
    EncoderSpec,
    EngineConfig,
    GraphConfig,
    LLMSpec,
    ReplicaResources,
    RouterSpec,
    SpeculativeConfig,
    default_graph_config,
)
from llmops_services.sources import ModelSourceError, resolve_source

__all__ = [
    "AUTO_MODEL",
    "EncoderSpec",
    "EngineConfig",
    "GraphConfig",
    "LLMSpec",
    "ModelSourceError",
    "ReplicaResources",
    "RouterSpec",
    "SpeculativeConfig",
    "default_graph_config",
    "resolve_source",
]

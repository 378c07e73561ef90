"""What the llmops deployables agree on: names, the OpenAI error shape, the graph config.

The gateway, the operator and the serving graph never import one another; each imports this
package, which needs nothing beyond pydantic (the base install).
"""

from llmops_contract.api import ApiError, RequestBodyError, parse_request_body
from llmops_contract.graph import (
    EncoderSpec,
    EngineConfig,
    GraphConfig,
    LLMSpec,
    ReplicaResources,
    RouterSpec,
    SpeculativeConfig,
    default_graph_config,
)
from llmops_contract.names import (
    API_VERSION,
    APP_NAME,
    AUTO_MODEL,
    ENCODER_DEPLOYMENT,
    GRAPH_IMPORT_PATH,
    GROUP,
    HELD_REQUESTS_METRIC,
    KIND,
    LLM_DEPLOYMENT_PREFIX,
    MODEL_KIND,
    MODEL_PLURAL,
    PLURAL,
    REQUEST_ID_HEADER,
    ROUTED_MODEL_HEADER,
    ROUTER_DEPLOYMENT,
    SCALED_TO_ZERO_CODE,
    TOKENIZER_PATH,
    VERSION,
    llm_deployment_name,
)
from llmops_contract.sources import ModelSourceError, ParsedSource, parse_source

__all__ = [
    "API_VERSION",
    "APP_NAME",
    "AUTO_MODEL",
    "ENCODER_DEPLOYMENT",
    "GRAPH_IMPORT_PATH",
    "GROUP",
    "HELD_REQUESTS_METRIC",
    "KIND",
    "LLM_DEPLOYMENT_PREFIX",
    "MODEL_KIND",
    "MODEL_PLURAL",
    "PLURAL",
    "REQUEST_ID_HEADER",
    "ROUTED_MODEL_HEADER",
    "ROUTER_DEPLOYMENT",
    "SCALED_TO_ZERO_CODE",
    "TOKENIZER_PATH",
    "VERSION",
    "ApiError",
    "EncoderSpec",
    "EngineConfig",
    "GraphConfig",
    "LLMSpec",
    "ModelSourceError",
    "ParsedSource",
    "ReplicaResources",
    "RequestBodyError",
    "RouterSpec",
    "SpeculativeConfig",
    "default_graph_config",
    "llm_deployment_name",
    "parse_request_body",
    "parse_source",
]

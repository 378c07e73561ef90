"""Gateway process settings: environment variables ``LLMOPS_GATEWAY_*``, built in `main()`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GpuModel(BaseModel):
    """What one replica of a GPU model holds, for the GPU-seconds of its usage records."""

    model_config = ConfigDict(extra="forbid")

    gpus: float = Field(gt=0, description="GPUs one replica holds (tensor x pipeline parallel).")
    slots: int = Field(
        ge=1, description="Sequences one replica runs at once (the engine's max_num_seqs)."
    )


class GatewaySettings(BaseSettings):
    """Everything the gateway process reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="LLMOPS_GATEWAY_", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Interface of the API port.")
    port: int = Field(default=8080, ge=0, le=65535, description="REST API port (0: any).")
    grpc_port: int | None = Field(
        default=50051, ge=0, le=65535, description="gRPC API port (0: any; null: no gRPC)."
    )
    metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Prometheus metrics port, apart from the API."
    )
    backends: dict[str, str] = Field(
        default_factory=dict,
        description="Model name -> base URL of the graph ingress serving it (JSON).",
    )
    default_backend: str | None = Field(
        default=None,
        description="Base URL for models not in `backends`; their names are asked from its "
        "/v1/models.",
    )
    discover_backends: bool = Field(
        default=False,
        description="Also route each model to the graph its LLMDeployment reports in "
        "status.endpoints.http (read-only list/watch); `backends` entries win.",
    )
    discover_namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces whose LLMDeployments are discovered; empty: all of them "
        "(needs cluster-wide list/watch).",
    )
    kube_api_url: str | None = Field(
        default=None,
        description="Kubernetes API URL needing no credentials (e.g. `kubectl proxy`) for "
        "discovery; None: the pod's service account, else the kubeconfig ($KUBECONFIG or "
        "~/.kube/config).",
    )
    keys_file: Path | None = Field(default=None, description="Key file (tenants and hashes).")
    redis_url: str | None = Field(
        default=None,
        description="Redis for limits shared by replicas: redis:// or rediss:// (TLS), with "
        "optional user, password and database number; None keeps them in memory.",
    )
    redis_failure_mode: Literal["open", "closed"] = Field(
        default="closed",
        description="When Redis is unreachable: 'open' admits requests, 'closed' refuses (503).",
    )
    redis_timeout_s: float = Field(
        default=2.0, gt=0, description="Longest a Redis connect or reply may take."
    )
    redis_retry_interval_s: float = Field(
        default=0.5,
        ge=0,
        description="After Redis fails, how long calls fail at once (and the failure mode "
        "answers) before one shared reconnect is tried.",
    )
    grpc_tls_cert_file: Path | None = Field(
        default=None,
        description="Server certificate chain of the gRPC port, PEM; with grpc_tls_key_file "
        "the port serves TLS only (null: plaintext, for a mesh or proxy that terminates TLS).",
    )
    grpc_tls_key_file: Path | None = Field(
        default=None, description="Private key of grpc_tls_cert_file, PEM."
    )
    grpc_tls_client_ca_file: Path | None = Field(
        default=None,
        description="CA bundle for client certificates: with it, gRPC clients must present a "
        "certificate it signs (mutual TLS).",
    )
    redis_tls_ca_file: Path | None = Field(
        default=None, description="CA bundle that signs the Redis server certificate (rediss://)."
    )
    redis_tls_cert_file: Path | None = Field(
        default=None, description="Client certificate for Redis (mutual TLS), PEM."
    )
    redis_tls_key_file: Path | None = Field(
        default=None, description="Private key of the Redis client certificate, PEM."
    )
    redis_tls_server_name: str | None = Field(
        default=None,
        description="Name the Redis server certificate must carry, when it differs from the "
        "URL's host (e.g. connecting by IP).",
    )
    client_rate_limit: str | None = Field(
        default=None,
        description="Requests per client address, before authentication (a `limits` string "
        "such as '1200/minute'); null: no limit. Behind a proxy missing from "
        "`trusted_proxies`, every client shares the proxy's address, and so this limit.",
    )
    client_refused_key_limit: str | None = Field(
        default="30/minute",
        description="Refused (missing, unknown, expired, revoked) keys per client address; "
        "over it, every request from the address gets 429 until the window ends. null: none.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or CIDR networks of proxies whose X-Forwarded-For names the "
        "client; the header from anyone else is ignored.",
    )
    docs_enabled: bool = Field(
        default=True, description="Serve the OpenAPI pages (/docs, /redoc, /openapi.json)."
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Larger bodies get 413.")
    default_max_tokens: int = Field(
        default=512,
        ge=1,
        description="Output cap for requests that set no max_tokens, for models without a "
        "context length in the default backend's /v1/models (vLLM's max_model_len, Ray Serve "
        "LLM's max_request_context_length; models routed by `backends` or discovery have "
        "none): the gateway sets it upstream, so the tokens it reserves bound what the "
        "request can use. Where the context length is known, it bounds the output instead "
        "and nothing is set.",
    )
    tokenizer_counting: bool = Field(
        default=True,
        description="Count prompt tokens with each model's tokenizer.json, fetched once per "
        "backend and model from the graph (llmops_contract.TOKENIZER_PATH); false: estimate "
        "them (about 3 characters a token).",
    )
    tokenizer_wait_s: float = Field(
        default=1.0,
        ge=0,
        description="Longest a request waits for its model's tokenizer to be fetched; after "
        "it, the request is estimated and the fetch goes on in the background.",
    )
    tokenizer_retry_s: float = Field(
        default=60.0,
        gt=0,
        description="After a failed fetch, or a backend without the tokenizer (404), how long "
        "prompts of that model are estimated before it is asked again.",
    )
    tokenizer_cache_size: int = Field(
        default=16, ge=1, description="Tokenizers kept in memory (least recently used go)."
    )
    image_part_tokens: int = Field(
        default=1280,
        ge=1,
        description="Prompt tokens of an image whose size cannot be read (a remote URL, an "
        "unknown format), and the most any image counts. 1280 is Qwen2-VL's usual max_pixels "
        "(1280 x 28 x 28); fixed-count encoders use fewer (LLaVA-1.5 576, Gemma 3 256).",
    )
    image_patch_px: int | None = Field(
        default=28,
        ge=1,
        description="Side in pixels of the square one image token covers: an inline PNG, JPEG, "
        "GIF or WebP counts round(w/p) x round(h/p) + 2 tokens, at most image_part_tokens "
        "(28: Qwen2-VL and Qwen2.5-VL, 14 px patches merged 2 x 2). null: every image counts "
        "image_part_tokens.",
    )
    audio_part_tokens: int = Field(
        default=750,
        ge=1,
        description="Prompt tokens of one audio part (750: a 30 s Whisper window as Qwen2-Audio "
        "encodes it).",
    )
    other_part_tokens: int = Field(
        default=4096,
        ge=1,
        description="Prompt tokens of one video or file part, or of a part of unknown type.",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Backend connect timeout.")
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a request may take end to end (504 after)."
    )
    hold_timeout_s: float = Field(
        default=300.0,
        ge=0,
        description="Longest a request is held for a model with no serving replica (scaled "
        "to zero, or its first replica starting) before 503 with Retry-After; about a vLLM "
        "cold start. Its quota stays reserved meanwhile. 0: never hold (the graph's 503 is "
        "answered as any other 503).",
    )
    hold_timeouts: dict[str, float] = Field(
        default_factory=dict,
        description="Model name -> its own hold_timeout_s (JSON), for models that start "
        "slower or faster than the rest.",
    )
    log_format: Literal["json", "console"] = Field(
        default="json", description="json for log collectors, console for people."
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight streams may finish."
    )
    usage_retention_days: float = Field(
        default=90.0,
        gt=0,
        description="How long usage records stay in the Redis stream (trimmed by age as "
        "records are added; `llmops usage` reads them).",
    )
    usage_file: Path | None = Field(
        default=None,
        description="Without Redis, the JSONL file usage records are appended to; null: "
        "usage.jsonl beside keys_file (none without a key file).",
    )
    otlp_traces_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP (protobuf) URL spans are sent to, e.g. "
        "http://otel-collector:4318/v1/traces; null: no tracing (and no cost).",
    )
    trace_sample: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded; a request with a W3C traceparent follows "
        "its sampled flag instead.",
    )
    gpu_models: dict[str, GpuModel] = Field(
        default_factory=dict,
        description="Model name -> GPUs and concurrent sequences of one replica (JSON); each "
        "usage record of these models is charged latency x gpus / slots GPU-seconds.",
    )

# syntax=docker/dockerfile:1
# The llmops gateway (`llmops gateway`): OpenAI-compatible REST, gRPC, metrics. Build from the
# repository root:
#   docker build -f deploy/images/gateway.Dockerfile -t ghcr.io/llmops-dev/llmops-gateway:0.1.0 .
# Settings come from LLMOPS_GATEWAY_* environment variables (the Helm chart sets them).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/llmops
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract contract
COPY cli cli
COPY services services
COPY gateway gateway
COPY operator operator
# One wheel holds every package (pure Python, under 1 MB); the `gateway` extra installs
# the gateway's dependencies only: no Ray, torch, transformers or vLLM
# (their absence is tested: tests/unit/test_install_extras.py).
RUN /opt/llmops/bin/pip install ".[gateway]"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 llmops \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin llmops
COPY --from=build /opt/llmops /opt/llmops
ENV PATH=/opt/llmops/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLMOPS_GATEWAY_HOST=0.0.0.0
# REST API, gRPC API, Prometheus metrics (the settings' defaults).
EXPOSE 8080 50051 9464
# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
ENTRYPOINT ["llmops", "gateway"]

# syntax=docker/dockerfile:1
# The llmops operator (`llmops operator`, Kopf). Build from the repository root:
#   docker build -f deploy/images/operator.Dockerfile -t ghcr.io/llmops-dev/llmops-operator:0.1.0 .
# Settings come from LLMOPS_OPERATOR_* environment variables (the Helm chart sets them).
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
# One wheel holds every package (pure Python, under 1 MB); the `operator` extra installs
# the operator's dependencies only (Kopf, the asyncio Kubernetes client):
# no Ray, torch, transformers or vLLM (tested: tests/unit/test_install_extras.py).
RUN /opt/llmops/bin/pip install ".[operator]"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 llmops \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin llmops
COPY --from=build /opt/llmops /opt/llmops
ENV PATH=/opt/llmops/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
ENTRYPOINT ["llmops", "operator"]

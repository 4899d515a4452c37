# syntax=docker/dockerfile:1
# The gateway image. CPU (ONNX Runtime on CPU, Python 3.11):
#   docker build -t infergate .
# GPU (onnxruntime-gpu from the `gpu` extra on a CUDA 12 + cuDNN 9 base; Ubuntu 24.04's Python 3.12):
#   docker build -t infergate:gpu --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 --build-arg EXTRA=gpu .
# Run it with a read-only root filesystem; only /tmp needs to be writable:
#   docker run --read-only --tmpfs /tmp -p 8001:8001 -p 9091:9091 \
#     -v $PWD/deploy/infergate.yaml:/etc/infergate/infergate.yaml:ro -v $PWD/deploy/models:/models:ro infergate
# The protobuf code is generated here from protos/ (gateway/_proto is not sent, see .dockerignore).
ARG BASE=python:3.11-slim-bookworm

# -- base: a Python 3.11+ with venv, shared by the build and the runtime so the venv moves over ----
FROM ${BASE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The python image has Python already; a CUDA base gets the distribution's. Versions are the
# distribution's own (the base image tag pins them), hence no per-package pins.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# -- build: generate protobuf code, install the package and its dependencies into /opt/venv -------
FROM base AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG EXTRA=""
WORKDIR /src
RUN python3 -m venv /opt/venv && python3 -m venv /opt/protoc
# grpcio-tools is pinned exactly, as in pyproject.toml, so the generated code matches the committed one.
RUN /opt/protoc/bin/pip install grpcio-tools==1.81.1
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY scripts ./scripts
COPY gateway ./gateway
COPY router ./router
COPY backends ./backends
COPY benchmarks ./benchmarks
RUN /opt/protoc/bin/python scripts/gen_protos.py
# EXTRA=gpu installs onnxruntime-gpu. It ships the same `onnxruntime` module as the CPU wheel the base
# dependencies bring, so the CPU wheel is removed and the GPU one reinstalled over the shared files.
RUN if [ -n "$EXTRA" ]; then \
      /opt/venv/bin/pip install ".[${EXTRA}]" \
      && gpu_pin="$(/opt/venv/bin/pip freeze | grep -i '^onnxruntime-gpu==')" \
      && /opt/venv/bin/pip uninstall -y onnxruntime \
      && /opt/venv/bin/pip install --force-reinstall --no-deps "$gpu_pin"; \
    else \
      /opt/venv/bin/pip install .; \
    fi \
    && /opt/venv/bin/python -c "import infergate.gateway._proto.inference.grpc_service_pb2, onnxruntime"

# -- runtime: the venv, a non-root user, read-only model and config folders -----------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="infergate" \
      org.opencontainers.image.description="Triton-compatible gRPC gateway: auth, routing, batching, fallback, telemetry" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# uid/gid 10001 own nothing in the image: the code, /models and /etc/infergate stay root's and read-only.
RUN groupadd --gid 10001 infergate \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin infergate \
    && mkdir -p /models /etc/infergate \
    && chmod 0555 /models /etc/infergate
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /tmp
USER 10001:10001
EXPOSE 8001 9091
STOPSIGNAL SIGTERM
# The gRPC health service (no token needed); exit 0 only while the gateway reports SERVING.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["infergate", "health", "--gateway", "127.0.0.1:8001"]
ENTRYPOINT ["infergate"]
CMD ["serve", "--config", "/etc/infergate/infergate.yaml"]

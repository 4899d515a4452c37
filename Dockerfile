# The gateway image: `docker build -t infergate .` then
# `docker run -p 8001:8001 -p 9091:9091 -v $PWD/deploy:/etc/infergate infergate`.
# CPU ONNX Runtime by default; for the CUDA provider build with --build-arg ORT=onnxruntime-gpu
# on a CUDA base image and set providers: [CUDAExecutionProvider, CPUExecutionProvider].
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY router ./router
COPY backends ./backends
COPY benchmarks ./benchmarks
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ARG ORT=""
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && if [ -n "$ORT" ]; then pip uninstall -y onnxruntime && pip install --no-cache-dir "$ORT"; fi
RUN useradd --uid 10001 --no-create-home infergate
USER 10001
EXPOSE 8001 9091
# Kubernetes probes use the gRPC health service on 8001 (no token needed); so does Docker's check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["infergate", "health", "--gateway", "127.0.0.1:8001", "--timeout-s", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["infergate"]
CMD ["serve", "--config", "/etc/infergate/infergate.yaml"]

"""A real Triton Inference Server (the binary inside nvidia-pytriton) serving test models.

Run as a script in its own process so tests can kill and restart it:

    python tests/support/triton_models.py --grpc-port P --http-port Q --metrics-port R [--otlp-traces-url URL]

With ``--otlp-traces-url`` Triton traces every request in its OpenTelemetry mode (rate 1, level
TIMESTAMPS) and exports the spans over OTLP/HTTP to that URL every 100 ms, with ``service.name``
``TRITON_SERVICE_NAME``; Triton continues the ``traceparent`` a gRPC call carries. pytriton's own
proxy-side tracer (which would need the OTLP/HTTP Python exporter) is left off.

Models (every one batched, max_batch_size 256; pytriton turns on Triton's dynamic batcher with no
queue delay, so it only merges requests that are already waiting):
- ``linear_v1`` / ``linear_v2``: ``LinearClassifier.random(seed=1|2)`` run by ONNX Runtime inside
  the bound callable; INPUT FP32 [-1, 16] -> SCORES, PROBS FP32 [-1, 4].
- ``linear_nobatcher`` (only with ``--nobatcher-model``, for the benchmarks): linear_v1 with no
  dynamic batcher (Triton runs each request on its own; still batched, so a client may send several
  rows in one request).
- ``failing``: same signature, raises on every call.
- ``slow``: same as linear_v1 after sleeping ``SLOW_DELAY_S``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from infergate.gateway.demo_models import LinearClassifier  # noqa: E402

SLOW_DELAY_S = 0.5
MAX_BATCH = 256
ACCESS_TOKEN = "infergate-tests"
"""Token of Triton's restricted endpoints (statistics...): tests read Triton's own ModelStatistics."""
STATISTICS_HEADERS = {"triton-grpc-protocol-triton-access-token": ACCESS_TOKEN}
"""gRPC headers for ``get_inference_statistics`` on the test Triton."""
TRITON_SERVICE_NAME = "triton-under-test"
"""``service.name`` of the spans Triton exports with ``--otlp-traces-url``."""


def trace_config(url: str) -> list[str]:
    """Triton's ``--trace-config`` settings: OpenTelemetry mode, every request, exported to ``url``."""
    return [
        "mode=opentelemetry",
        "rate=1",
        "level=TIMESTAMPS",
        f"opentelemetry,url={url}",
        "opentelemetry,bsp_schedule_delay=100",
        f"opentelemetry,resource=service.name={TRITON_SERVICE_NAME}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--nobatcher-model", action="store_true", help="also serve linear_nobatcher")
    parser.add_argument("--otlp-traces-url", default="")
    args = parser.parse_args()

    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    workdir = Path(tempfile.mkdtemp(prefix="infergate-triton-models-"))
    sessions = {}
    for name, seed in (("linear_v1", 1), ("linear_v2", 2)):
        path = LinearClassifier.random(seed=seed).save(workdir / f"{name}.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def onnx_callable(session):
        @batch
        def infer(INPUT):
            return _run(session, INPUT)

        return infer

    @batch
    def failing(INPUT):
        raise RuntimeError("this model always fails")

    @batch
    def slow(INPUT):
        time.sleep(SLOW_DELAY_S)
        return _run(sessions["linear_v1"], INPUT)

    inputs = [Tensor(name="INPUT", dtype=np.float32, shape=(16,))]
    outputs = [Tensor(name="SCORES", dtype=np.float32, shape=(4,)), Tensor(name="PROBS", dtype=np.float32, shape=(4,))]
    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        exit_timeout_secs=1,
        log_verbose=0,
        trace_config=trace_config(args.otlp_traces_url) if args.otlp_traces_url else None,
    )
    bind_options = {}
    if args.otlp_traces_url:
        import opentelemetry.trace
        from pytriton.proxy.telemetry import set_telemetry_tracer

        # Triton's server-side spans only: with a tracer set and an empty per-model trace config,
        # pytriton builds no proxy tracer and its Python models configure none (both would need
        # opentelemetry-exporter-otlp-proto-http, which is not installed).
        set_telemetry_tracer(opentelemetry.trace.NoOpTracer())
        bind_options["trace_config"] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config, security_config=TritonSecurityConfig(access_token=ACCESS_TOKEN)) as triton:
        model_config = ModelConfig(max_batch_size=MAX_BATCH)
        triton.bind("linear_v1", onnx_callable(sessions["linear_v1"]), inputs, outputs, config=model_config, **bind_options)
        triton.bind("linear_v2", onnx_callable(sessions["linear_v2"]), inputs, outputs, config=model_config, **bind_options)
        if args.nobatcher_model:
            triton.bind(
                "linear_nobatcher", onnx_callable(sessions["linear_v1"]), inputs, outputs,
                config=ModelConfig(max_batch_size=MAX_BATCH, batcher=None), **bind_options,
            )
        triton.bind("failing", failing, inputs, outputs, config=model_config, **bind_options)
        triton.bind("slow", slow, inputs, outputs, config=model_config, **bind_options)
        triton.run()
        print(f"triton ready grpc_port {args.grpc_port}", flush=True)
        while not stop.wait(0.2):
            pass
    return 0


def _run(session, INPUT):
    scores, probs = session.run(["SCORES", "PROBS"], {"INPUT": INPUT.astype(np.float32)})
    return {"SCORES": scores, "PROBS": probs}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

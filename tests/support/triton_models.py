"""A real Triton Inference Server (the binary inside nvidia-pytriton) serving test models.

Run as a script in its own process so tests can kill and restart it:

    python tests/support/triton_models.py --grpc-port P --http-port Q --metrics-port R

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--nobatcher-model", action="store_true", help="also serve linear_nobatcher")
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
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config, security_config=TritonSecurityConfig(access_token=ACCESS_TOKEN)) as triton:
        model_config = ModelConfig(max_batch_size=MAX_BATCH)
        triton.bind("linear_v1", onnx_callable(sessions["linear_v1"]), inputs, outputs, config=model_config)
        triton.bind("linear_v2", onnx_callable(sessions["linear_v2"]), inputs, outputs, config=model_config)
        if args.nobatcher_model:
            triton.bind(
                "linear_nobatcher", onnx_callable(sessions["linear_v1"]), inputs, outputs,
                config=ModelConfig(max_batch_size=MAX_BATCH, batcher=None),
            )
        triton.bind("failing", failing, inputs, outputs, config=model_config)
        triton.bind("slow", slow, inputs, outputs, config=model_config)
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

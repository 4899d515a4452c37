"""The OTLP collector down or black-holed (issue 9, the suite): calls are unaffected, memory flat.

Telemetry must never fail or slow a request (the span processor's queue is bounded and drops).
Two real gateways export every span (sample ratio 1.0): one to a port where nothing listens, one
to a black hole that accepts TCP connections and never answers. Each serves 3,000 calls; all must
succeed with correct answers and RSS must stay flat after warm-up. Latency is printed beside a
gateway without export (speed is recorded, not asserted).
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import numpy as np
import pytest

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.reliability.conftest import gateway_running, rss_bytes
from tests.support.models import FEATURES, classifier, onnx_config
from tests.support.processes import free_port

pytestmark = pytest.mark.reliability

CALLS = 3000
WARMUP = 500
RSS_GROWTH_LIMIT_BYTES = 24 << 20


class BlackHole:
    """A TCP listener that accepts connections and never reads or answers."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


def serve_calls(url: str, pid: int) -> tuple[float, int]:
    """Median latency (ms) of CALLS calls after WARMUP, and the RSS growth over them."""
    reference = classifier(1).reference
    latencies = []
    with grpc.insecure_channel(url) as channel:
        stub = GRPCInferenceServiceStub(channel)
        rng = np.random.default_rng(7)
        after_warmup = 0
        for n in range(WARMUP + CALLS):
            if n == WARMUP:
                after_warmup = rss_bytes(pid)
            x = rng.normal(size=(1, FEATURES)).astype("<f4")
            request = pb.ModelInferRequest(model_name="linear", id=str(n))
            request.inputs.add(name="INPUT", datatype="FP32", shape=[1, FEATURES])
            request.raw_input_contents.append(x.tobytes())
            started = time.perf_counter()
            answer = stub.ModelInfer(request, timeout=10)
            latencies.append(time.perf_counter() - started)
            scores = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(1, -1)
            assert answer.outputs[0].name == "SCORES" and np.allclose(scores, reference(x)["SCORES"], atol=1e-4)
    return float(np.median(latencies[WARMUP:]) * 1000), rss_bytes(pid) - after_warmup


@pytest.mark.parametrize("collector", ["down", "black hole"])
def test_calls_are_unaffected_when_the_collector_is_down_or_black_holed(model_paths, tmp_path, collector):
    hole = BlackHole() if collector == "black hole" else None
    port = hole.port if hole is not None else free_port()
    try:
        with gateway_running(onnx_config(model_paths), tmp_path, "no-export") as plain:
            baseline_ms, _ = serve_calls(plain.url, plain.process.pid)
        config = dict(onnx_config(model_paths), telemetry={"otlp_endpoint": f"http://127.0.0.1:{port}", "sample_ratio": 1.0})
        with gateway_running(config, tmp_path, "export") as gateway:
            exported_ms, grown = serve_calls(gateway.url, gateway.process.pid)
    finally:
        if hole is not None:
            hole.close()
    print(f"collector {collector}: median {exported_ms:.2f} ms vs {baseline_ms:.2f} ms without export; "
          f"RSS grew {grown / 2**20:.1f} MiB over {CALLS} calls")
    assert grown < RSS_GROWTH_LIMIT_BYTES, f"RSS grew {grown >> 20} MiB"

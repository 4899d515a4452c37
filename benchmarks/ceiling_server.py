"""The ceiling: a bare grpc.aio inference server that answers every ModelInfer with one fixed response.

It does what any Python grpc.aio server must do for a call (parse the request, serialize the
response) and nothing else: no validation, no routing, no model. Its throughput and latency are the
best a Python grpc.aio server can reach on the machine, the yardstick for the gateway's numbers.
The response is precomputed once and has the gateway's shape for the bundled classifier
(``SCORES`` and ``PROBS``, FP32 [1, 4], ``parameters["variant"]`` set), so both put the same
bytes on the wire. Enough of the rest (ServerLive/Ready, ModelReady, ModelMetadata) is there for
``tritonclient``.

    python -m infergate.benchmarks.ceiling_server --port 0     # prints "ceiling server listening on port N"
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import numpy as np

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
from infergate.gateway.converters import encode_infer_response
from infergate.gateway.demo_models import LinearClassifier

MODEL = "classifier"
VARIANT = "ceiling"


def fixed_response(model: str = MODEL) -> pb.ModelInferResponse:
    """What the gateway answers for one row through the bundled classifier (any row: the size is fixed)."""
    classifier = LinearClassifier.random(seed=1)
    row = np.zeros((1, classifier.features), dtype=np.float32)
    return encode_infer_response(model, "", classifier.reference(row), VARIANT)


def model_metadata(model: str = MODEL) -> pb.ModelMetadataResponse:
    classifier = LinearClassifier.random(seed=1)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model,
        versions=["1"],
        platform="ceiling",
        inputs=[tensor(name=classifier.input_name, datatype="FP32", shape=[-1, classifier.features])],
        outputs=[tensor(name=name, datatype="FP32", shape=[-1, classifier.classes]) for name in ("SCORES", "PROBS")],
    )


class CeilingServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every model name is served and every request gets the same response object."""

    def __init__(self) -> None:
        self._response = fixed_response()
        self._metadata = model_metadata()

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        return self._metadata

    async def ModelInfer(self, request, context):
        return self._response


async def serve(port: int, host: str = "127.0.0.1") -> int:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(CeilingServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        print(f"ceiling server: cannot bind {host}:{port}", flush=True)
        return 1
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ceiling server listening on port {bound}", flush=True)
    await stop.wait()
    await server.stop(0.5)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    return asyncio.run(serve(args.port, args.host))


if __name__ == "__main__":
    raise SystemExit(main())

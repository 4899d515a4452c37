"""The lean server: the least real work a Python server can do per inference call.

grpc.aio parses the ``ModelInferRequest``; the servicer reads each input with ``np.frombuffer``,
runs ONNX Runtime inline on the event loop (one thread) and encodes the outputs in raw contents,
with ``parameters["variant"]`` set as the gateway does. Nothing else: no validation, routing,
batching, auth or metrics. The gateway's per-call cost is judged against this floor.

    python -m infergate.benchmarks.lean_server --model classifier.onnx --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import numpy as np
import onnxruntime as ort

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class LeanServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    async def ModelInfer(self, request, context):
        feeds = {
            tensor.name: np.frombuffer(raw, DTYPES[tensor.datatype]).reshape(tensor.shape)
            for tensor, raw in zip(request.inputs, request.raw_input_contents)
        }
        names = [output.name for output in self._session.get_outputs()]
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.parameters["variant"].string_param = "lean"
        for name, array in zip(names, self._session.run(names, feeds)):
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.astype(np.float32, copy=False).tobytes())
        return response


async def serve(model_path: str, port: int, host: str) -> int:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(LeanServicer(model_path), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print(f"lean server listening on port {bound}", flush=True)
    await stop.wait()
    await server.stop(0.5)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="ONNX file to serve under any model name")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    return asyncio.run(serve(args.model, args.port, args.host))


if __name__ == "__main__":
    raise SystemExit(main())

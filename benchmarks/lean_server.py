"""The lean server: the least real work a Python server can do per inference call.

grpc.aio parses the ``ModelInferRequest``; the servicer reads each input with ``np.frombuffer``,
runs ONNX Runtime inline on the event loop (one thread) and encodes the outputs in raw contents,
with ``parameters["variant"]`` set as the gateway does. Nothing else: no validation, routing,
batching, auth or metrics. The gateway's per-call cost is judged against this floor.

    python -m infergate.benchmarks.lean_server --model classifier.onnx --port 0

With ``--features REDIS_URL`` it is also the floor for online features: a request whose input is
named ``--entity-input`` (INT64 ids) has that input replaced by the rows of those ids, read with one
MGET of ``--key-template`` keys (packed float32), built and sent as the gateway does
(``MgetTemplate``, the pipelined connection of ``gateway/redis_pipe.py``), and one
``np.frombuffer``; every other request is served as above. No checks for missing rows: the least a
server that fetches features can do per call.
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
from infergate.gateway.features import MgetTemplate
from infergate.gateway.redis_pipe import RedisPipe

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class Features:
    """What ``--features`` adds: entity ids in, their packed float32 rows out, one MGET per call."""

    def __init__(self, url: str, entity_input: str, feature_input: str, key_template: str, dim: int) -> None:
        self.entity_input = entity_input
        self.feature_input = feature_input
        prefix, _, suffix = key_template.partition("{id}")
        self._mget = MgetTemplate(prefix.encode(), suffix.encode())
        self._dim = dim
        self._redis = RedisPipe(url)

    async def rows(self, ids: np.ndarray) -> np.ndarray:
        (values,) = await self._redis.execute(self._mget.command(ids), 1, 1.0)
        return np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), self._dim)


class LeanServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_path: str, features: Features | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self._features = features

    async def ModelInfer(self, request, context):
        feeds = {
            tensor.name: np.frombuffer(raw, DTYPES[tensor.datatype]).reshape(tensor.shape)
            for tensor, raw in zip(request.inputs, request.raw_input_contents)
        }
        features = self._features
        if features is not None and features.entity_input in feeds:
            feeds[features.feature_input] = await features.rows(feeds.pop(features.entity_input))
        names = [output.name for output in self._session.get_outputs()]
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.parameters["variant"].string_param = "lean"
        for name, array in zip(names, self._session.run(names, feeds)):
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.astype(np.float32, copy=False).tobytes())
        return response


async def serve(model_path: str, port: int, host: str, features: argparse.Namespace | None = None) -> int:
    server = grpc.aio.server()
    fetcher = None
    if features is not None:
        fetcher = Features(features.features, features.entity_input, features.feature_input, features.key_template, features.dim)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(LeanServicer(model_path, fetcher), server)
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
    parser.add_argument("--features", default="", metavar="REDIS_URL", help="read entity rows from this Redis")
    parser.add_argument("--entity-input", default="USER_ID", help="with --features: the INT64 input of entity ids")
    parser.add_argument("--feature-input", default="FEATURES", help="with --features: the model input the rows go to")
    parser.add_argument("--key-template", default="user_profile:{id}", help="with --features: the key of one row")
    parser.add_argument("--dim", type=int, default=16, help="with --features: floats per row")
    args = parser.parse_args()
    return asyncio.run(serve(args.model, args.port, args.host, args if args.features else None))


if __name__ == "__main__":
    raise SystemExit(main())

"""The gateway's own CPU per call, in one process, without the network: the production handler
chain (auth check, memory budget, decoding, servicer, pipeline, backend, response serialization)
called directly with a serialized request, beside the lean server's servicer on the same model.

    taskset -c 0 python -m infergate.benchmarks.handler_cost --rounds 5 --calls 5000

A pinned end-to-end run (``benchmarks/pinned/hotpath.sh``) spreads by about ±5 % on this machine,
which hides a 10 µs change in a 450 µs call. Here grpc's own work (HTTP/2, the poller thread,
the call's task) is left out, and with it most of the noise: what remains is exactly what the
gateway adds per call, in microseconds, measured side by side with the lean floor (parse, one
ONNX Runtime run inline, encode). Targets, all on the MLP 64-256-256-2 with one FP32 [1, 64] row:

- ``lean``: ``benchmarks/lean_server.py``'s servicer, with the request parsed and the answer
  serialized as grpc would;
- ``plain``: auth off, one variant, no batching;
- ``auth``: plain with a JWT checked (warm cache);
- ``2var``: plain with two variants 90/10;
- ``batch``: plain with batching on (32 rows, 2 ms; a lone caller goes out at once);
- ``full``: auth, two variants and batching together.

Calls run one after another (concurrency 1), targets interleaved within each round; the figure is
the median over rounds of microseconds of process CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import runpy
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


class _Context:
    """What the handler chain asks of a grpc.aio ServicerContext on a successful call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float:
        return 10.0

    async def abort(self, code, details: str = ""):
        raise RuntimeError(f"call aborted: {code} {details}")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class _Capture:
    """Stands where DecodingRegistry expects a server: keeps the wrapped method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.handlers.update({f"/{service}/{name}": handler for name, handler in handlers.items()})

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same methods, also registered by name above


def _mlp(path: Path) -> Path:
    """The pinned benchmarks' MLP (``benchmarks/pinned/mlp.py``, a script beside this package)."""
    build = runpy.run_path(str(Path(__file__).resolve().parent / "pinned" / "mlp.py"))["mlp"]
    build(str(path))
    return path


def _configs(model: Path, jwks: Path) -> dict[str, dict]:
    variant = {"backend": "onnx_cpu", "path": str(model)}
    one = {"v1": {**variant, "weight": 100}}
    two = {"v1": {**variant, "weight": 90}, "v2": {**variant, "weight": 10}}
    batching = {"max_batch_size": 32, "max_delay_us": 2000}
    auth = {"mode": "jwt", "issuer": "https://auth.bench", "audience": "infergate", "algorithms": ["RS256"],
            "jwks_file": str(jwks)}

    def config(variants: dict, with_auth: bool = False, batched: bool = False) -> dict:
        model_config: dict = {"variants": variants}
        if batched:
            model_config["batching"] = batching
        return {
            "server": {"listen": "127.0.0.1:0", "metrics_listen": ""},
            "auth": auth if with_auth else {"mode": "none"},
            "backends": {"onnx_cpu": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}},
            "models": {"mlp": model_config},
        }

    return {
        "plain": config(one),
        "auth": config(one, with_auth=True),
        "2var": config(two),
        "batch": config(one, batched=True),
        "full": config(two, with_auth=True, batched=True),
    }


async def _gateway_call(config: dict):
    """A started gateway and a coroutine function that makes one call through its handler chain."""
    from infergate.gateway.admission import MemoryBudget
    from infergate.gateway.config import parse_config
    from infergate.gateway.server import Gateway
    from infergate.gateway.wire import DecodingRegistry

    gateway = Gateway(parse_config(config))
    await gateway.start()
    capture = _Capture()
    registry = DecodingRegistry(
        capture,  # type: ignore[arg-type]
        MemoryBudget(gateway.config.server.max_inflight_request_bytes),
        gateway.auth.interceptor if gateway.auth is not None else None,
        gateway.refused_calls.auth_refused,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(gateway._servicer, registry)
    handler = capture.handlers[METHOD]
    return gateway, handler.unary_unary, handler.response_serializer


def _lean_call(model: Path):
    from infergate.benchmarks.lean_server import LeanServicer

    servicer = LeanServicer(str(model))

    async def call(raw: bytes, context) -> pb.ModelInferResponse:
        return await servicer.ModelInfer(pb.ModelInferRequest.FromString(raw), context)

    return call, pb.ModelInferResponse.SerializeToString


async def _measure(call, serialize, raw: bytes, context, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        serialize(await call(raw, context))
    return 1e6 * (time.process_time() - started) / calls


async def _main(args) -> dict:
    from infergate.gateway.auth.tokens import mint_token, public_jwks
    from cryptography.hazmat.primitives.asymmetric import rsa

    workdir = Path(tempfile.mkdtemp(prefix="infergate-handler-cost-"))
    model = _mlp(workdir / "mlp.onnx")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(key, "k1", "RS256")))
    token = mint_token(key, algorithm="RS256", issuer="https://auth.bench", audience="infergate", subject="bench",
                       scopes=["infer:*"], ttl_s=7200, kid="k1")
    request = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[np.random.default_rng(1).normal(size=(1, 64)).astype("<f4").tobytes()],
    )
    raw = request.SerializeToString()
    context = _Context((("authorization", f"Bearer {token}"),))

    targets = {"lean": _lean_call(model)}
    gateways = []
    wanted = set(args.only.split(",")) if args.only else None
    for name, config in _configs(model, jwks).items():
        if wanted is not None and name not in wanted:
            continue
        gateway, call, serialize = await _gateway_call(config)
        gateways.append(gateway)
        targets[name] = (call, serialize)
    try:
        for call, serialize in targets.values():  # warm-up, and a check that every target answers
            response = pb.ModelInferResponse.FromString(serialize(await call(raw, context)))
            assert response.raw_output_contents, "no output"
            await _measure(call, serialize, raw, context, args.calls // 5)
        rounds: dict[str, list[float]] = {name: [] for name in targets}
        for index in range(args.rounds):
            order = list(targets) if index % 2 == 0 else list(reversed(targets))
            for name in order:
                call, serialize = targets[name]
                rounds[name].append(await _measure(call, serialize, raw, context, args.calls))
    finally:
        for gateway in gateways:
            await gateway.stop(0)
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--json", type=Path, help="write the rounds here")
    parser.add_argument("--only", default="", help="comma-separated targets to run (default: all; lean always runs)")
    args = parser.parse_args()
    rounds = asyncio.run(_main(args))
    lean = statistics.median(rounds["lean"])
    for name, values in rounds.items():
        median = statistics.median(values)
        print(f"{name:6s} {median:7.1f} µs CPU per call  (lean + {median - lean:6.1f}; rounds: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

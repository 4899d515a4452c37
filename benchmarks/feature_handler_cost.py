"""What an online-feature fetch costs the gateway's handler chain, in one process, beside the lean
server's fetch: where ``benchmarks/feature_fetch.py`` measures whole processes under grpc, this
leaves grpc out and counts only the work of the chain, so a few microseconds show.

    taskset -c 0 python -m infergate.benchmarks.feature_handler_cost --redis-cpus 1 --rounds 5 --calls 3000

The model and requests are ``feature_fetch``'s: ``direct`` sends 64 x 16 FP32 features, ``fetched``
64 INT64 entity ids whose rows come from a real ``redis-server`` (one MGET, packed float32).
Targets: ``lean-direct`` and ``lean-fetched`` (``benchmarks/lean_server.py``'s servicer, with
``--features``), ``direct`` and ``fetched`` (one gateway serving both models through the production
handler chain). ``--concurrency`` callers run at once, so fetches share writes to Redis as they do
under load. The figure is the median over rounds of microseconds of process CPU per call. Give
Redis its own CPU (``--redis-cpus``), or a profile of this process counts Redis's turns as its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from infergate.benchmarks.cpus import children_pinned_to, parse_cpu_list
from infergate.benchmarks.feature_fetch import DIM, ENTITIES, _model, _requests
from infergate.benchmarks.handler_cost import _Context, _gateway_call
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway.local_redis import LocalRedis


def _config(model: Path, redis_url: str) -> dict:
    variants = {"v1": {"backend": "onnx_cpu", "path": str(model), "weight": 1}}
    return {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": ""},
        "auth": {"mode": "none"},
        "redis": {"url": redis_url},
        "backends": {"onnx_cpu": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}},
        "feature_views": {"user_profile": {"key_template": "user_profile:{id}", "encoding": "float32", "dim": DIM}},
        "models": {
            "fetched": {"features": {"view": "user_profile", "entity_input": "USER_ID", "feature_input": "FEATURES"},
                        "variants": variants},
            "direct": {"variants": variants},
        },
    }


def _lean(model: Path, redis_url: str):
    from infergate.benchmarks.lean_server import Features, LeanServicer

    servicer = LeanServicer(str(model), Features(redis_url, "USER_ID", "FEATURES", "user_profile:{id}", DIM))

    async def call(raw: bytes, context) -> pb.ModelInferResponse:
        return await servicer.ModelInfer(pb.ModelInferRequest.FromString(raw), context)

    return call, pb.ModelInferResponse.SerializeToString


async def _measure(call, serialize, raw: bytes, context, calls: int, concurrency: int) -> float:
    per_caller = max(calls // concurrency, 1)

    async def caller() -> None:
        for _ in range(per_caller):
            serialize(await call(raw, context))

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return 1e6 * (time.process_time() - started) / (per_caller * concurrency)


async def _main(args) -> dict[str, list[float]]:
    workdir = Path(tempfile.mkdtemp(prefix="infergate-feature-handler-cost-"))
    rows = np.random.default_rng(1).normal(size=(ENTITIES, DIM)).astype(np.float32)
    with children_pinned_to(parse_cpu_list(args.redis_cpus) if args.redis_cpus else None):
        redis = LocalRedis().start()
    gateway = None
    try:
        import redis as redis_sync

        client = redis_sync.Redis.from_url(redis.url)
        client.mset({f"user_profile:{i}": rows[i].astype("<f4").tobytes() for i in range(ENTITIES)})
        client.close()
        model = _model(workdir / "scorer.onnx")
        requests = _requests(rows)
        context = _Context(())
        gateway, gateway_call, gateway_serialize = await _gateway_call(_config(model, redis.url))
        lean_call, lean_serialize = _lean(model, redis.url)
        targets = {
            "lean-direct": (lean_call, lean_serialize, requests["direct"]),
            "lean-fetched": (lean_call, lean_serialize, requests["fetched"]),
            "direct": (gateway_call, gateway_serialize, requests["direct"]),
            "fetched": (gateway_call, gateway_serialize, requests["fetched"]),
        }
        answers = {}
        for name, (call, serialize, raw) in targets.items():  # warm-up, and a check that every target answers alike
            response = pb.ModelInferResponse.FromString(serialize(await call(raw, context)))
            answers[name] = np.frombuffer(response.raw_output_contents[0], "<f4")
            await _measure(call, serialize, raw, context, args.calls // 5, args.concurrency)
        first = answers["lean-direct"]
        for name, answer in answers.items():
            if not np.allclose(answer, first, rtol=1e-5, atol=1e-6):
                raise AssertionError(f"{name} answered differently from lean-direct")
        if args.only:
            targets = {name: target for name, target in targets.items() if name in args.only.split(",")}
        rounds: dict[str, list[float]] = {name: [] for name in targets}
        for index in range(args.rounds):
            order = list(targets) if index % 2 == 0 else list(reversed(targets))
            for name in order:
                call, serialize, raw = targets[name]
                rounds[name].append(await _measure(call, serialize, raw, context, args.calls, args.concurrency))
    finally:
        if gateway is not None:
            await gateway.stop(0)
        redis.stop()
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-cpus", default="", help="CPUs for redis-server (default: this process's)")
    parser.add_argument("--json", type=Path, help="write the rounds here")
    parser.add_argument("--only", default="", help="comma-separated targets to time (default: all; all are checked)")
    args = parser.parse_args()
    rounds = asyncio.run(_main(args))
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    for name, values in rounds.items():
        print(f"{name:12s} {medians[name]:7.1f} µs CPU per call  (rounds: " + ", ".join(f"{v:.1f}" for v in values) + ")")
    if len(medians) == 4:
        print(f"a fetch adds: gateway {medians['fetched'] - medians['direct']:.1f} µs, "
              f"lean {medians['lean-fetched'] - medians['lean-direct']:.1f} µs per call")
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What online features cost the gateway: a call that fetches 64 entities x 16 floats from Redis,
against the same call with those 64 x 16 features sent in the request.

    python -m infergate.benchmarks.feature_fetch --server-cpus 0 --client-cpus 1 \
        --rounds 3 --duration-s 3 --concurrency 32 --out benchmarks/results/feature_fetch

One gateway serves two models on one ONNX file (FP32 [N, 16] -> [N, 2]): ``fetched`` takes INT64
entity ids [64] and reads their rows from a real ``redis-server`` (one MGET, packed float32);
``direct`` takes the FP32 [64, 16] rows themselves. The gateway and Redis run on ``--server-cpus``,
the load (one grpc.aio process sending pre-serialized requests) on ``--client-cpus``. The two
alternate within each round; the figures are medians over rounds. Reported per model: requests/s,
the gateway's CPU time per call (from /proc, also apart as user and system time), and for
``fetched`` the fetch duration from the gateway's own histogram (the share of fetches under 1 ms,
and its p99 bucket).

``--with-lean`` adds the floor beside it: ``benchmarks/lean_server.py --features`` (grpc.aio, one
MGET on the same pipelined connection, one ``np.frombuffer``, ONNX inline, nothing else), sent the
same two requests in the same rounds as ``lean-fetched`` and ``lean-direct``. Its fetched ÷ direct
ratio is what waiting on Redis costs any grpc.aio server, before any gateway work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from infergate.benchmarks.cpus import children_pinned_to, parse_cpu_list, process_user_system_s
from infergate.benchmarks.loadgen import drive, summarize
from infergate.gateway.local_redis import LocalRedis

from infergate.benchmarks.scenarios import LeanProcess  # (also puts the checkout's tests/support on sys.path)
from tests.support.processes import GatewayProcess  # noqa: E402  (scenarios put the checkout on sys.path)

ENTITIES = 64
DIM = 16
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(7).normal(size=(DIM, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["FEATURES", "W"], ["SCORE"])],
        "scorer",
        [helper.make_tensor_value_info("FEATURES", TensorProto.FLOAT, ["N", DIM])],
        [helper.make_tensor_value_info("SCORE", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _requests(rows: np.ndarray) -> dict[str, bytes]:
    from infergate.gateway._proto.inference import grpc_service_pb2 as pb

    ids = np.arange(ENTITIES, dtype=np.int64)
    fetched = pb.ModelInferRequest(
        model_name="fetched",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="USER_ID", datatype="INT64", shape=[ENTITIES])],
        raw_input_contents=[ids.tobytes()],
    )
    direct = pb.ModelInferRequest(
        model_name="direct",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="FEATURES", datatype="FP32", shape=[ENTITIES, DIM])],
        raw_input_contents=[rows.astype("<f4").tobytes()],
    )
    return {"fetched": fetched.SerializeToString(), "direct": direct.SerializeToString()}


async def _measure(url: str, request: bytes, concurrency: int, warmup_s: float, duration_s: float, pid: int):
    """The tally of one run, and the gateway's CPU seconds over its measured window."""
    import grpc

    loop = asyncio.get_running_loop()
    start = time.monotonic() + 0.05
    marks: list[tuple[float, float]] = []
    loop.call_at(start + warmup_s, lambda: marks.append(process_user_system_s(pid)))
    loop.call_at(start + warmup_s + duration_s, lambda: marks.append(process_user_system_s(pid)))

    async with grpc.aio.insecure_channel(url) as channel:
        infer = channel.unary_unary(MODEL_INFER)

        async def call(_index: int) -> tuple[str, str]:
            try:
                await infer(request, timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details() or ""
            return "OK", ""

        tally = await drive(call, concurrency, start, warmup_s, duration_s)
        await asyncio.sleep(0.01)
        return tally, marks[1][0] - marks[0][0], marks[1][1] - marks[0][1]


def _ratios(fetched: list[dict], direct: list[dict]) -> dict[str, float]:
    """Medians over rounds of the per-round fetched ÷ direct ratios (each round measured side by side)."""
    pairs = list(zip(fetched, direct))
    return {
        "rps": statistics.median(f["rps"] / d["rps"] for f, d in pairs),
        "cpu_per_call": statistics.median(f["cpu_ms_per_call"] / d["cpu_ms_per_call"] for f, d in pairs),
    }


def _fetch_histogram(metrics_port: int) -> dict[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("infergate_feature_fetch_duration_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--redis-cpus", default="", help="CPUs for redis-server (default: the server CPUs)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("feature-fetch-results"))
    parser.add_argument("--with-lean", action="store_true", help="also measure the lean server fetching the same rows")
    args = parser.parse_args()
    server_cpus = parse_cpu_list(args.server_cpus)
    os.sched_setaffinity(0, parse_cpu_list(args.client_cpus))
    workdir = Path(tempfile.mkdtemp(prefix="infergate-feature-fetch-"))
    rows = np.random.default_rng(1).normal(size=(ENTITIES, DIM)).astype(np.float32)
    with children_pinned_to(parse_cpu_list(args.redis_cpus) if args.redis_cpus else server_cpus):
        redis = LocalRedis().start()
    try:
        import redis as redis_sync

        client = redis_sync.Redis.from_url(redis.url)
        client.mset({f"user_profile:{i}": rows[i].astype("<f4").tobytes() for i in range(ENTITIES)})
        client.close()
        model = _model(workdir / "scorer.onnx")
        config = {
            "auth": {"mode": "none"},
            "redis": {"url": redis.url},
            "backends": {"onnx_cpu": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}},
            "feature_views": {"user_profile": {"key_template": "user_profile:{id}", "encoding": "float32", "dim": DIM}},
            "models": {
                "fetched": {
                    "features": {"view": "user_profile", "entity_input": "USER_ID", "feature_input": "FEATURES"},
                    "variants": {"v1": {"backend": "onnx_cpu", "path": str(model), "weight": 1}},
                },
                "direct": {"variants": {"v1": {"backend": "onnx_cpu", "path": str(model), "weight": 1}}},
            },
        }
        gateway = GatewayProcess(config, workdir)
        lean = LeanProcess(model, workdir, features=redis.url) if args.with_lean else None
        with children_pinned_to(server_cpus):
            gateway.start()
            if lean is not None:
                lean.start()
        try:
            requests = _requests(rows)
            targets = {name: (gateway.url, gateway.process.pid, request) for name, request in requests.items()}
            if lean is not None:
                targets.update({f"lean-{name}": (lean.url, lean.process.pid, request) for name, request in requests.items()})
            rounds: dict[str, list[dict]] = {name: [] for name in targets}
            for round_index in range(args.rounds):
                order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
                for name in order:
                    url, pid, request = targets[name]
                    tally, user_s, system_s = asyncio.run(
                        _measure(url, request, args.concurrency, args.warmup_s, args.duration_s, pid)
                    )
                    result = summarize(name, args.concurrency, 0.0, args.duration_s, [tally])
                    calls = max(result.requests, 1)
                    rounds[name].append({"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                                         "errors": result.errors, "cpu_ms_per_call": 1000 * (user_s + system_s) / calls,
                                         "user_ms_per_call": 1000 * user_s / calls, "system_ms_per_call": 1000 * system_s / calls})
            histogram = _fetch_histogram(gateway.metrics_port)
        finally:
            gateway.stop()
            if lean is not None:
                lean.stop()
    finally:
        redis.stop()
    summary = {name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in rounds.items()}
    ratios = _ratios(rounds["fetched"], rounds["direct"])
    total = histogram.get(float("inf"), 0.0)
    under_1ms = histogram.get(0.001, 0.0) / total if total else 0.0
    p99_bucket = next((le for le, count in sorted(histogram.items()) if total and count / total >= 0.99), None)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m infergate.benchmarks.feature_fetch", *sys.argv[1:]]),
        "entities": ENTITIES, "dim": DIM, "concurrency": args.concurrency,
        "server_cpus": args.server_cpus, "client_cpus": args.client_cpus, "redis_cpus": args.redis_cpus or args.server_cpus,
        "rounds": rounds, "median": summary,
        "ratio_fetched_to_direct": ratios,
        "fetches": int(total), "fetch_share_under_1ms": under_1ms, "fetch_p99_bucket_s": p99_bucket,
    }
    if lean is not None:
        report["lean_ratio_fetched_to_direct"] = _ratios(rounds["lean-fetched"], rounds["lean-direct"])
        report["gateway_over_lean_cpu_added_ms"] = {
            "gateway": summary["fetched"]["cpu_ms_per_call"] - summary["direct"]["cpu_ms_per_call"],
            "lean": summary["lean-fetched"]["cpu_ms_per_call"] - summary["lean-direct"]["cpu_ms_per_call"],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, values in summary.items():
        print(f"{name:12s} rps {values['rps']:8.0f}  p50 {values['p50_ms']:6.2f} ms  p99 {values['p99_ms']:6.2f} ms  "
              f"server CPU {values['cpu_ms_per_call']:.3f} ms/call (user {values['user_ms_per_call']:.3f}, "
              f"system {values['system_ms_per_call']:.3f})  errors {values['errors']:.0f}")
    ratio = report["ratio_fetched_to_direct"]
    print(f"fetched / direct: requests/s {ratio['rps']:.2f}, CPU per call {ratio['cpu_per_call']:.2f}")
    if lean is not None:
        floor, added = report["lean_ratio_fetched_to_direct"], report["gateway_over_lean_cpu_added_ms"]
        print(f"lean fetched / lean direct: requests/s {floor['rps']:.2f}, CPU per call {floor['cpu_per_call']:.2f}")
        print(f"CPU a fetch adds per call: gateway {1000 * added['gateway']:.0f} µs, lean {1000 * added['lean']:.0f} µs")
    print(f"fetches: {int(total)}, {100 * under_1ms:.1f} % under 1 ms, p99 at or under {p99_bucket} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What variant selection costs per call, next to a whole call through the gateway.

    python -m infergate.benchmarks.router_cost --out benchmarks/results/router

1. **Selection, in process**: ``RouteSelector`` (the pipeline's chooser) on a 90/10 route, timed
   with ``timeit`` for a call without a sticky key (weighted random), with a sticky key (BLAKE2b of
   the key, bucket lookup), with a pin, and a constant chooser as the floor (what any chooser call
   costs). Nanoseconds of CPU per call.
2. **Whole call**: one ``infergate serve`` process (ONNX Runtime, CPU) with a single-variant model
   (no routing decision to make) and a two-variant 90/10 model with a sticky key; the unmodified
   ``tritonclient.grpc.aio`` load generator calls each, one caller at a time (closed loop,
   concurrency 1), interleaved: ``single``, ``weighted``, ``sticky`` (key in metadata), repeated.

The ratios that matter are selection time / whole-call p50. Servers run in a process of their
own (``tests/support/processes.py``, so run this from a source checkout), the load generator in
this one. Read ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/support lives in the checkout, beside this package
    sys.path.insert(0, str(ROOT))

from infergate.benchmarks.loadgen import run_load, single_row_inputs  # noqa: E402
from infergate.gateway.demo_models import LinearClassifier  # noqa: E402
from tests.support.processes import GatewayProcess  # noqa: E402


def selection_cost_ns(calls: int) -> dict[str, float]:
    """Best-of-5 nanoseconds per selection, by kind of call."""
    from infergate.backends.base import ModelSignature
    from infergate.gateway.config import parse_config
    from infergate.gateway.pipeline import CallContext, ModelEndpoint
    from infergate.router.selector import PIN_METADATA, RouteSelector
    from infergate.router.table import Route, RouteTable

    config = parse_config(
        {
            "backends": {"cpu": {"kind": "onnx"}},
            "models": {"ab": {"routing": {"sticky_key": "user_id"}, "variants": {
                "v1": {"backend": "cpu", "path": "/v1.onnx", "weight": 90},
                "v2": {"backend": "cpu", "path": "/v2.onnx", "weight": 10},
            }}},
        }
    ).models["ab"]
    routes = RouteTable()
    routes.install(Route("ab", ("v1", "v2"), {"v1": 90, "v2": 10}, revision=1))
    selector = RouteSelector(routes, rng=random.Random(1))
    selector.configure("ab", "user_id")
    endpoint = ModelEndpoint("ab", config, {"v1": object(), "v2": object()},  # type: ignore[dict-item]
                             ModelSignature(inputs=(), outputs=(), batched=True))
    plain = CallContext(metadata={}, parameters={}, deadline=0.0)
    keyed = [CallContext(metadata={}, parameters={"user_id": f"user-{i}"}, deadline=0.0) for i in range(1000)]
    pinned = CallContext(metadata={PIN_METADATA: "v2"}, parameters={}, deadline=0.0)
    selector(endpoint, plain)  # build the plan once, as a route change does

    def constant(endpoint, ctx) -> str:
        return "v1"

    contexts = iter(keyed * (calls // len(keyed) + 2))
    cases = {
        "constant chooser (floor)": lambda: constant(endpoint, plain),
        "weighted random": lambda: selector(endpoint, plain),
        "sticky key": lambda: selector(endpoint, next(contexts)),
        "pin": lambda: selector(endpoint, pinned),
    }
    results = {}
    for name, case in cases.items():
        contexts = iter(keyed * (5 * calls // len(keyed) + 2))
        timer = timeit.Timer(case)
        results[name] = round(min(timer.repeat(repeat=5, number=calls)) / calls * 1e9, 1)
    return results


def gateway_config(model_dir: Path) -> dict:
    v1 = str(LinearClassifier.random(seed=1).save(model_dir / "v1.onnx"))
    v2 = str(LinearClassifier.random(seed=2).save(model_dir / "v2.onnx"))
    return {
        "server": {"metrics_listen": ""},
        "backends": {"onnx_cpu": {"kind": "onnx", "intra_op_threads": 1}},
        "models": {
            "single": {"variants": {"v1": {"backend": "onnx_cpu", "path": v1, "weight": 100}}},
            "ab": {
                "routing": {"sticky_key": "user_id"},
                "variants": {
                    "v1": {"backend": "onnx_cpu", "path": v1, "weight": 90},
                    "v2": {"backend": "onnx_cpu", "path": v2, "weight": 10},
                },
            },
        },
    }


async def whole_call(url: str, duration_s: float, rounds: int) -> dict[str, dict]:
    """p50/p99 per target over ``rounds`` interleaved runs (the median round's p50 is reported)."""
    targets = {"single": ("single", None), "weighted": ("ab", None), "sticky": ("ab", {"user_id": "user-42"})}
    runs: dict[str, list] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (model, headers) in targets.items():
            result = await run_load(url, model, 1, duration_s, single_row_inputs(), target=name, warmup_s=0.5, headers=headers)
            if result.errors:
                raise SystemExit(f"{name}: {result.errors} errors {result.error_codes}")
            runs[name].append(result)
    summary = {}
    for name, results in runs.items():
        results.sort(key=lambda r: r.p50_ms)
        middle = results[len(results) // 2]
        summary[name] = {"p50_ms": middle.p50_ms, "p99_ms": middle.p99_ms, "rps": middle.rps,
                         "p50_ms_all_rounds": [r.p50_ms for r in runs[name]]}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Folder for results.json.")
    parser.add_argument("--calls", type=int, default=200_000, help="Selections per timing.")
    parser.add_argument("--duration-s", type=float, default=3.0, help="Seconds per whole-call run.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of whole-call runs.")
    args = parser.parse_args()

    selection = selection_cost_ns(args.calls)
    with tempfile.TemporaryDirectory(prefix="infergate-router-bench-") as tmp:
        gateway = GatewayProcess(gateway_config(Path(tmp)), Path(tmp), name="router-bench").start()
        try:
            calls = asyncio.run(whole_call(gateway.url, args.duration_s, args.rounds))
        finally:
            gateway.stop()
    floor_ns = selection["constant chooser (floor)"]
    single_p50_ns = calls["single"]["p50_ms"] * 1e6
    ratios = {
        name: {"selection_ns": ns, "above_floor_ns": round(ns - floor_ns, 1),
               "share_of_single_call_p50": round((ns - floor_ns) / single_p50_ns, 6)}
        for name, ns in selection.items()
    }
    results = {"selection_ns": selection, "whole_call": calls, "ratios": ratios,
               "p50_ratio_to_single": {name: round(c["p50_ms"] / calls["single"]["p50_ms"], 3) for name, c in calls.items()}}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

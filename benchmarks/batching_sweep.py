"""Dynamic batching: throughput and p99 against ``max_batch_size`` and ``max_delay_us``, batching off beside.

    python -m infergate.benchmarks.batching_sweep --out benchmarks/results/batching

One ``infergate serve`` process hosts one model per configuration, for both backends: ONNX Runtime
in the gateway (CPU) and a real Triton (nvidia-pytriton's binary, ``linear_v1``, started here in
a process of its own). Every model serves the same ``LinearClassifier`` (16 features to 4 classes).
The load generator (``benchmarks.loadgen.run_load``, unmodified ``tritonclient.grpc.aio``) runs
in this process: 64 closed-loop callers, one FP32 row each per call. Every configuration, batching
off included, is measured once per round; rounds alternate the order (forward, then backward), so
drift over the run falls on all configurations alike, and the report averages the rounds. Ratios
are against batching off on the same backend. The mean batch size of each run is read from the
gateway's own ``infergate_batch_size`` histogram.

Writes ``OUT/results.json`` and ``OUT/report.md``. Servers come from ``tests/support/processes.py``
(run from a source checkout). Absolute numbers are noisy on a shared machine; read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/support lives in the checkout, beside this package
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from infergate.benchmarks.loadgen import run_load, single_row_inputs  # noqa: E402
from infergate.gateway.demo_models import LinearClassifier  # noqa: E402
from tests.support.processes import GatewayProcess, TritonProcess  # noqa: E402

BATCH_SIZES = (8, 32, 64)
"""max_batch_size values swept at DELAY_FOR_SIZES_US."""
DELAY_FOR_SIZES_US = 1000
DELAYS_US = (0, 500, 1000, 4000)
"""max_delay_us values swept at SIZE_FOR_DELAYS."""
SIZE_FOR_DELAYS = 64
BACKENDS = ("onnx", "triton")


@dataclass(frozen=True)
class Setting:
    backend: str
    max_batch_size: int = 0
    """0: batching off."""
    max_delay_us: int = 0

    @property
    def model(self) -> str:
        if not self.max_batch_size:
            return f"{self.backend}_off"
        return f"{self.backend}_b{self.max_batch_size}_d{self.max_delay_us}"


def settings(backend: str) -> list[Setting]:
    """Batching off, then the sweep."""
    grid = [(size, DELAY_FOR_SIZES_US) for size in BATCH_SIZES]
    grid += [(SIZE_FOR_DELAYS, delay) for delay in DELAYS_US if (SIZE_FOR_DELAYS, delay) not in grid]
    return [Setting(backend), *(Setting(backend, size, delay) for size, delay in grid)]


def gateway_config(model_path: Path, triton_url: str) -> dict:
    backends = {
        "onnx": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1},
        "triton": {"kind": "triton", "url": triton_url, "timeout_ms": 10000},
    }
    models = {}
    for backend in BACKENDS:
        for setting in settings(backend):
            variant = {"backend": backend, "weight": 100}
            variant.update({"path": str(model_path)} if backend == "onnx" else {"model": "linear_v1"})
            model = {"variants": {"v1": variant}}
            if setting.max_batch_size:
                model["batching"] = {"max_batch_size": setting.max_batch_size, "max_delay_us": setting.max_delay_us}
            models[setting.model] = model
    return {"auth": {"mode": "none"}, "redis": {"url": ""}, "backends": backends, "models": models}


def batch_counts(metrics_url: str, model: str) -> tuple[float, float]:
    """(rows, batches) the gateway has sent for ``model`` so far."""
    text = httpx.get(metrics_url, timeout=10).text
    rows = batches = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "infergate_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_sum"):
                rows = sample.value
            elif sample.name.endswith("_count"):
                batches = sample.value
    return rows, batches


async def sweep(gateway: GatewayProcess, concurrency: int, duration_s: float, warmup_s: float, rounds: int) -> list[dict]:
    """One row per configuration and round; odd rounds run the configurations in reverse order."""
    metrics_url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    order = [setting for backend in BACKENDS for setting in settings(backend)]
    rows = []
    for round_index in range(rounds):
        for setting in order if round_index % 2 == 0 else order[::-1]:
            before = batch_counts(metrics_url, setting.model)
            result = await run_load(
                gateway.url, setting.model, concurrency, duration_s, single_row_inputs(16, "INPUT"),
                target=setting.model, warmup_s=warmup_s,
            )
            after = batch_counts(metrics_url, setting.model)
            batches = after[1] - before[1]
            row = {
                **result.row(),
                "round": round_index,
                "backend": setting.backend,
                "max_batch_size": setting.max_batch_size,
                "max_delay_us": setting.max_delay_us,
                "mean_batch_rows": round((after[0] - before[0]) / batches, 2) if batches else None,
            }
            print(
                f"{setting.model:>18}: {row['rps']:8.1f} req/s p50 {row['p50_ms']:7.2f} ms "
                f"p99 {row['p99_ms']:7.2f} ms mean batch {row['mean_batch_rows']} errors {row['errors']}",
                flush=True,
            )
            rows.append(row)
    return rows


def averaged(rows: list[dict]) -> list[dict]:
    """One row per configuration: the mean over rounds of rate, latencies and batch size."""
    out = []
    for target in dict.fromkeys(r["target"] for r in rows):
        runs = [r for r in rows if r["target"] == target]
        first = runs[0]
        mean = {key: round(sum(r[key] for r in runs) / len(runs), 2) for key in ("rps", "p50_ms", "p99_ms")}
        batch_rows = [r["mean_batch_rows"] for r in runs if r["mean_batch_rows"] is not None]
        out.append({
            "target": target,
            "backend": first["backend"],
            "max_batch_size": first["max_batch_size"],
            "max_delay_us": first["max_delay_us"],
            **mean,
            "rps_per_round": [r["rps"] for r in runs],
            "mean_batch_rows": round(sum(batch_rows) / len(batch_rows), 2) if batch_rows else None,
            "errors": sum(r["errors"] for r in runs),
        })
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Every batching configuration against batching off on the same backend (averaged rows)."""
    off = {r["backend"]: r for r in rows if not r["max_batch_size"]}
    return [
        {
            "target": row["target"],
            "rps_ratio": round(row["rps"] / off[row["backend"]]["rps"], 2) if off[row["backend"]]["rps"] else None,
            "p99_ratio": round(row["p99_ms"] / off[row["backend"]]["p99_ms"], 2) if off[row["backend"]]["p99_ms"] else None,
        }
        for row in rows
        if row["max_batch_size"]
    ]


def report(meta: dict, rows: list[dict], compared: list[dict]) -> str:
    ratio_of = {r["target"]: r for r in compared}
    lines = [
        "# Dynamic batching sweep",
        "",
        f"- Machine: {meta['machine']}. Date: {meta['date']}.",
        f"- Command: `{meta['command']}`",
        f"- {meta['concurrency']} closed-loop callers, one FP32 row [1, 16] per call; "
        f"{meta['warmup_s']} s warm-up then {meta['duration_s']} s measured per run; "
        f"{meta['rounds']} rounds averaged (requests/s of each round in the last column).",
        "",
        "| backend | max_batch_size | max_delay_us | requests/s | p50 ms | p99 ms | mean rows/batch | errors "
        "| requests/s vs off | p99 vs off | requests/s per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        ratio = ratio_of.get(row["target"], {})
        batching = bool(row["max_batch_size"])
        lines.append(
            f"| {row['backend']} | {row['max_batch_size'] if batching else 'off'} | "
            f"{row['max_delay_us'] if batching else '-'} | {row['rps']:.0f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['mean_batch_rows'] if batching else 1} | {row['errors']} | "
            f"{ratio.get('rps_ratio', '-')} | {ratio.get('p99_ratio', '-')} | "
            f"{', '.join(f'{rps:.0f}' for rps in row['rps_per_round'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batching"))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--machine", default="2-core CPU sandbox, no GPU, shared with other jobs")
    args = parser.parse_args()
    meta = {
        "machine": args.machine,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m infergate.benchmarks.batching_sweep", *sys.argv[1:]]),
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="infergate-batching-") as workdir:
        work = Path(workdir)
        model_path = LinearClassifier.random(seed=1).save(work / "linear_v1.onnx")
        triton = TritonProcess(work).start()
        try:
            gateway = GatewayProcess(gateway_config(model_path, triton.url), work, name="batching-gateway").start()
            try:
                runs = asyncio.run(sweep(gateway, args.concurrency, args.duration_s, args.warmup_s, args.rounds))
            finally:
                gateway.stop()
        finally:
            triton.stop()
    rows = averaged(runs)
    compared = ratios(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({**meta, "results": rows, "ratios": compared, "runs": runs}, indent=2) + "\n", encoding="utf-8"
    )
    (args.out / "report.md").write_text(report(meta, rows, compared), encoding="utf-8")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")
    return 1 if any(r["errors"] or not r["rps"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

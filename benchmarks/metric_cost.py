"""What one metric update costs on the hot path, one worker (in memory) against several (mmap files).

    python -m infergate.benchmarks.metric_cost

With ``server.workers > 1`` prometheus-client runs in multiprocess mode: every value lives in a
memory-mapped file under ``PROMETHEUS_MULTIPROC_DIR`` and an update packs it into the mapping
under a lock. The mode is fixed when prometheus-client is imported, so each mode is timed in a
fresh interpreter. Timed with ``timeit`` over the gateway's own metric objects: a labelled counter
``inc`` (``labels()`` lookup included, as the pipeline does it), a histogram ``observe`` on a child
held by the caller (as the batcher does it), and the in-flight gauge ``inc`` + ``dec`` pair of
every call. Nanoseconds of CPU per update, best of 5 repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_TIMED = {
    "counter labels().inc()": "metrics.REQUESTS.labels('m', 'v1', 'OK').inc()",
    "histogram child observe()": "histogram.observe(0.0012)",
    "gauge labels() inc()+dec()": "gauge = metrics.IN_FLIGHT.labels('m'); gauge.inc(); gauge.dec()",
}


def _measure(number: int) -> dict[str, float]:
    import timeit

    from infergate.gateway import metrics

    namespace = {"metrics": metrics, "histogram": metrics.QUEUE_WAIT.labels("m", "v1")}
    return {
        name: min(timeit.repeat(statement, number=number, repeat=5, globals=namespace)) / number * 1e9
        for name, statement in _TIMED.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=200_000, help="Updates per repeat.")
    parser.add_argument("--child", choices=("yes",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.number)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="infergate-metric-cost-") as directory:
        for mode, extra in (("one worker (in memory)", {}), ("several workers (multiprocess mmap)", {"PROMETHEUS_MULTIPROC_DIR": directory})):
            env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
            env.update(extra)
            argv = [sys.executable, "-m", "infergate.benchmarks.metric_cost", "--child", "yes", "--number", str(args.number)]
            results[mode] = json.loads(subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout)
    modes = list(results)
    print(f"{'update':32} " + " ".join(f"{mode:>38}" for mode in modes) + "   ratio")
    for name in _TIMED:
        values = [results[mode][name] for mode in modes]
        print(f"{name:32} " + " ".join(f"{value:35.0f} ns" for value in values) + f"   {values[1] / values[0]:.2f}x")


if __name__ == "__main__":
    main()

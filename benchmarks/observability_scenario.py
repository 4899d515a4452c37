"""``infergate bench --scenario observability``: what tracing and model monitoring cost, side by side.

Five ``infergate serve`` processes on the same bundled classifier (ONNX Runtime, batching off, no
Redis, auth off), differing only in their observability settings, plus a real OTLP receiver
(``benchmarks.otlp_sink``) for the traced ones:

- ``gateway-plain``: no tracing, no monitoring (the reference; pass ``--baseline gateway-plain``);
- ``gateway-monitoring``: ``monitoring.enabled`` with the default 1 % sample and ``class_output``
  set, so each call also keeps its prediction for feedback (the most the monitor does per call);
- ``gateway-trace-0``, ``gateway-trace-0.01``, ``gateway-trace-1``: tracing to the receiver at
  ``telemetry.sample_ratio`` 0, 0.01 and 1.

    infergate bench --scenario observability --baseline gateway-plain --concurrency 32 --rounds 3

The report's ratios against ``gateway-plain`` are the cost figures: req/s, p99 and the gateway's
CPU time per call (each target carries its process id; ``benchmarks.bench`` reads the process
tree's CPU time from ``/proc`` over each measured window). The gateways start on the server CPUs
(``--server-cpus``, by default the first half); the OTLP receiver is started outside that set, so
it runs with the load generator (on the client CPUs when the bench pins its load) and its work to
decode spans is not charged to the gateways, as a collector on another host would not be. Run it
on an otherwise idle machine: the five gateways share the server CPUs, one at a time under load.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from infergate.benchmarks.bench import Target
from infergate.benchmarks.cpus import children_pinned_to
from infergate.gateway.demo_models import LinearClassifier

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/support lives in the checkout, beside this package
    sys.path.insert(0, str(ROOT))

from tests.support.processes import GatewayProcess, _Process, _python_env  # noqa: E402

MODEL = "classifier"
SINK_START_TIMEOUT_S = 30.0
TRACE_RATIOS = (0.0, 0.01, 1.0)


class OtlpSinkProcess(_Process):
    def __init__(self, log_dir: Path) -> None:
        self.port: int | None = None
        argv = [sys.executable, "-m", "infergate.benchmarks.otlp_sink", "--port", "0"]
        super().__init__(argv, log_dir / "otlp-sink.log", _python_env())

    def start(self) -> OtlpSinkProcess:
        self.port = int(self._spawn(re.compile(r"otlp sink listening on port (\d+)"), SINK_START_TIMEOUT_S).group(1))
        return self


def gateway_config(model_path: Path, **blocks) -> dict:
    config = {
        "server": {"metrics_listen": ""},
        "auth": {"mode": "none"},
        "redis": {"url": ""},
        "backends": {"onnx_cpu": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}},
        "models": {MODEL: {"variants": {"v1": {"backend": "onnx_cpu", "path": str(model_path), "weight": 100}}}},
    }
    config.update(blocks)
    return config


DESCRIPTIONS = {
    "gateway-plain": "infergate serve: auth off, no Redis, one ONNX variant, batching off; no tracing, no monitoring",
    "gateway-monitoring": "the same with monitoring.enabled (1 % of rows sampled, class_output PROBS: predictions kept for feedback)",
    **{
        f"gateway-trace-{ratio:g}": f"the same with tracing to a real OTLP/gRPC receiver, telemetry.sample_ratio {ratio:g}"
        for ratio in TRACE_RATIOS
    },
}


@contextlib.contextmanager
def observability(workdir: Path, server_cpus: frozenset[int] | None = None) -> Iterator[list[Target]]:
    """Start the scenario's servers and yield its targets; every process is stopped after.

    The gateways run on ``server_cpus`` (None: wherever this process may run); each target carries
    its gateway's process id, for the report's CPU time per call.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[_Process] = []
    try:
        model_path = LinearClassifier.random(seed=1).save(workdir / f"{MODEL}.onnx")
        sink = OtlpSinkProcess(workdir)
        started.append(sink)
        sink.start()
        configs = {
            "gateway-plain": gateway_config(model_path),
            "gateway-monitoring": gateway_config(
                model_path, monitoring={"enabled": True, "models": {MODEL: {"class_output": "PROBS"}}}
            ),
        }
        for ratio in TRACE_RATIOS:
            telemetry = {"otlp_endpoint": f"http://127.0.0.1:{sink.port}", "sample_ratio": ratio}
            configs[f"gateway-trace-{ratio:g}"] = gateway_config(model_path, telemetry=telemetry)
        targets = []
        for name, config in configs.items():
            gateway = GatewayProcess(config, workdir, name=name)
            started.append(gateway)
            with children_pinned_to(server_cpus):
                gateway.start()
            assert gateway.process is not None
            targets.append(Target(name, gateway.url, MODEL, pid=gateway.process.pid, description=DESCRIPTIONS[name]))
        yield targets
    finally:
        for process in reversed(started):
            process.stop()

"""Scenarios ``infergate bench --scenario NAME`` starts by itself, each server in a process of its own.

``serving``: the gateway (``infergate serve``) over ONNX Runtime on the bundled ``LinearClassifier``
with batching off, and the ceiling server (``benchmarks.ceiling_server``); with Triton, also a real
Triton (nvidia-pytriton's binary serving the same classifier as ``linear_v1``) called directly and
through the gateway. Everything listens on free loopback ports and is stopped on the way out.

The server processes come from ``tests/support/processes.py``, so scenarios run from a source
checkout (``tests`` is not part of the installed package); ``--target`` benches running servers
from anywhere.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from infergate.benchmarks.bench import Target
from infergate.gateway.demo_models import LinearClassifier

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/support lives in the checkout, beside this package
    sys.path.insert(0, str(ROOT))

from tests.support.processes import GatewayProcess, TritonProcess, _Process, _python_env  # noqa: E402

SCENARIOS = ("serving", "observability")  # observability: benchmarks/observability_scenario.py
CEILING_START_TIMEOUT_S = 30.0
MODEL = "classifier"
TRITON_MODEL = "linear_v1"  # tests/support/triton_models.py: LinearClassifier.random(seed=1), as here
GATEWAY_TRITON_MODEL = "classifier_triton"


class CeilingProcess(_Process):
    """``python -m infergate.benchmarks.ceiling_server`` on a free port."""

    def __init__(self, log_dir: Path) -> None:
        self.port: int | None = None
        argv = [sys.executable, "-m", "infergate.benchmarks.ceiling_server", "--port", "0"]
        super().__init__(argv, log_dir / "ceiling.log", _python_env())

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> CeilingProcess:
        match = self._spawn(re.compile(r"ceiling server listening on port (\d+)"), CEILING_START_TIMEOUT_S)
        self.port = int(match.group(1))
        return self


def gateway_config(model_path: Path, triton_url: str | None = None) -> dict:
    """The gateway of the serving scenario: auth off, no Redis, no batching, one ONNX thread per run."""
    backends: dict = {"onnx_cpu": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}}
    models: dict = {MODEL: {"variants": {"v1": {"backend": "onnx_cpu", "path": str(model_path), "weight": 100}}}}
    if triton_url:
        backends["triton"] = {"kind": "triton", "url": triton_url, "timeout_ms": 5000}
        models[GATEWAY_TRITON_MODEL] = {"variants": {"v1": {"backend": "triton", "model": TRITON_MODEL, "weight": 100}}}
    return {
        "server": {"metrics_listen": ""},
        "auth": {"mode": "none"},
        "redis": {"url": ""},
        "backends": backends,
        "models": models,
    }


@contextlib.contextmanager
def serving(workdir: Path, with_triton: bool = False) -> Iterator[list[Target]]:
    """Start the serving scenario's servers and yield its targets; every process is stopped after."""
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[_Process] = []
    try:
        model_path = LinearClassifier.random(seed=1).save(workdir / f"{MODEL}.onnx")
        triton = None
        if with_triton:
            triton = TritonProcess(workdir)
            started.append(triton)
            triton.start()
        gateway = GatewayProcess(gateway_config(model_path, triton.url if triton else None), workdir)
        started.append(gateway)
        gateway.start()
        ceiling = CeilingProcess(workdir)
        started.append(ceiling)
        ceiling.start()
        targets = [Target("ceiling", ceiling.url, MODEL), Target("gateway-onnx", gateway.url, MODEL)]
        if triton is not None:
            targets += [
                Target("triton", triton.url, TRITON_MODEL),
                Target("gateway-triton", gateway.url, GATEWAY_TRITON_MODEL, compare_to="triton"),
            ]
        yield targets
    finally:
        for process in reversed(started):
            process.stop()


@contextlib.contextmanager
def start_scenario(name: str, workdir: Path, with_triton: bool = False) -> Iterator[list[Target]]:
    """The servers of scenario ``name`` (one of ``SCENARIOS``), running for the duration of the block."""
    if name == "observability":
        from infergate.benchmarks.observability_scenario import observability

        with observability(workdir) as targets:
            yield targets
        return
    if name != "serving":
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    with serving(workdir, with_triton) as targets:
        yield targets

"""Scenarios ``infergate bench --scenario NAME`` starts by itself, each server in a process of its own.

``serving``: the gateway (``infergate serve``) over ONNX Runtime on the bundled ``LinearClassifier``
with batching off, the lean server (``benchmarks.lean_server``: parse, one ONNX run inline, encode)
on the same model file, and the ceiling server (``benchmarks.ceiling_server``: a fixed answer);
with Triton, also a real Triton (nvidia-pytriton's binary serving the same classifier as
``linear_v1``) called directly and through the gateway. Everything listens on free loopback ports,
starts on the CPUs given (``server_cpus``, inherited by every thread and child of the servers) and
is stopped on the way out. Each target carries its process id, for its CPU time, and a one-line
description for the report.

The server processes come from ``tests/support/processes.py``, so scenarios run from a source
checkout (``tests`` is not part of the installed package; importing this module outside one raises
``ModuleNotFoundError`` for ``tests``, which ``infergate bench`` turns into an explained refusal);
``--target`` benches running servers from anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from infergate.benchmarks.bench import Target
from infergate.benchmarks.cpus import children_pinned_to
from infergate.gateway.demo_models import LinearClassifier

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "tests" / "support").is_dir() and str(ROOT) not in sys.path:  # tests/support lives in the checkout, beside this package
    sys.path.insert(0, str(ROOT))

from tests.support.processes import GatewayProcess, TritonProcess, _Process, _python_env  # noqa: E402

SCENARIOS = ("serving", "observability", "scaling")  # observability: benchmarks/observability_scenario.py
SCALING_WORKERS = (1, 2, 4, 8)
"""The worker counts of the scaling scenario (those that fit in the server CPUs)."""
CEILING_START_TIMEOUT_S = 30.0
LEAN_START_TIMEOUT_S = 30.0
MODEL = "classifier"
TRITON_MODEL = "linear_v1"  # tests/support/triton_models.py: LinearClassifier.random(seed=1), as here
TRITON_MODEL_NO_BATCHER = "linear_nobatcher"  # the same model with no dynamic batcher in Triton
GATEWAY_TRITON_MODEL = "classifier_triton"
GATEWAY_TRITON_MODEL_NO_BATCHER = "classifier_triton_nobatcher"


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


class LeanProcess(_Process):
    """``python -m infergate.benchmarks.lean_server`` on a free port, serving ``model_path``."""

    def __init__(self, model_path: Path, log_dir: Path, features: str = "") -> None:
        """``features``: a Redis URL to read entity rows from (``lean_server --features``)."""
        self.port: int | None = None
        argv = [sys.executable, "-m", "infergate.benchmarks.lean_server", "--model", str(model_path), "--port", "0"]
        if features:
            argv += ["--features", features]
        super().__init__(argv, log_dir / "lean.log", _python_env())

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LeanProcess:
        match = self._spawn(re.compile(r"lean server listening on port (\d+)"), LEAN_START_TIMEOUT_S)
        self.port = int(match.group(1))
        return self


def gateway_config(model_path: Path, triton_url: str | None = None) -> dict:
    """The gateway of the serving scenario: auth off, no Redis, one ONNX thread per run; the ONNX
    model unbatched, the Triton ones batched by the gateway (idle dispatch, up to 64 rows)."""
    backends: dict = {"onnx_cpu": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}}
    models: dict = {MODEL: {"variants": {"v1": {"backend": "onnx_cpu", "path": str(model_path), "weight": 100}}}}
    if triton_url:
        backends["triton"] = {"kind": "triton", "url": triton_url, "timeout_ms": 5000}
        for name, target in ((GATEWAY_TRITON_MODEL, TRITON_MODEL), (GATEWAY_TRITON_MODEL_NO_BATCHER, TRITON_MODEL_NO_BATCHER)):
            models[name] = {
                "batching": {"max_batch_size": 64},
                "variants": {"v1": {"backend": "triton", "model": target, "weight": 100}},
            }
    return {
        "server": {"metrics_listen": ""},
        "auth": {"mode": "none"},
        "redis": {"url": ""},
        "backends": backends,
        "models": models,
    }


Phase = Callable[[str, float], contextlib.AbstractContextManager]
"""``phase(label, expected_s)``: a progress display around a step that may take a while."""


@contextlib.contextmanager
def _quiet_phase(label: str, expected_s: float) -> Iterator[None]:
    yield


@contextlib.contextmanager
def serving(
    workdir: Path, with_triton: bool = False, server_cpus: frozenset[int] | None = None, phase: Phase = _quiet_phase
) -> Iterator[list[Target]]:
    """Start the serving scenario's servers on ``server_cpus`` and yield its targets; all are stopped after."""
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[_Process] = []

    def start(process: _Process, label: str, expected_s: float) -> None:
        started.append(process)
        with phase(f"starting {label}", expected_s), children_pinned_to(server_cpus):
            process.start()

    try:
        model_path = LinearClassifier.random(seed=1).save(workdir / f"{MODEL}.onnx")
        triton = None
        if with_triton:
            triton = TritonProcess(workdir, nobatcher_model=True)
            start(triton, "Triton (nvidia-pytriton)", 30.0)
        gateway = GatewayProcess(gateway_config(model_path, triton.url if triton else None), workdir)
        start(gateway, "the gateway", 5.0)
        lean = LeanProcess(model_path, workdir)
        start(lean, "the lean server", 2.0)
        ceiling = CeilingProcess(workdir)
        start(ceiling, "the ceiling server", 2.0)
        model = f"LinearClassifier 16 -> 4 ({model_path.name})"
        targets = [
            Target("ceiling", ceiling.url, MODEL, pid=ceiling.process.pid,
                   description="benchmarks/ceiling_server.py: grpc.aio answering every call with one fixed response "
                               "(parse and serialize only): the most a Python gRPC server can do here"),
            Target("lean", lean.url, MODEL, pid=lean.process.pid,
                   description=f"benchmarks/lean_server.py: grpc.aio, np.frombuffer, ONNX Runtime inline (1 thread), "
                               f"encode; nothing else. {model}: the floor for real work per call"),
            Target("gateway-onnx", gateway.url, MODEL, compare_to="lean", pid=gateway.process.pid,
                   description=f"infergate serve: auth off, no Redis, one ONNX variant, batching off, 1 worker. {model}"),
        ]
        if triton is not None:
            targets += [
                Target("triton", triton.url, TRITON_MODEL, pid=triton.process.pid,
                       description="Triton Inference Server (nvidia-pytriton's binary), the same classifier as a "
                                   "Python-backend model, called directly"),
                Target("gateway-triton", gateway.url, GATEWAY_TRITON_MODEL, compare_to="triton", pid=gateway.process.pid,
                       description="infergate serve in front of that Triton, batching on (idle dispatch, 64 rows); "
                                   "the gateway's CPU time only"),
                Target("triton-nobatcher", triton.url, TRITON_MODEL_NO_BATCHER, pid=triton.process.pid,
                       description="the same Triton model with no dynamic batcher, called directly"),
                Target("gateway-triton-nobatcher", gateway.url, GATEWAY_TRITON_MODEL_NO_BATCHER,
                       compare_to="triton-nobatcher", pid=gateway.process.pid,
                       description="infergate serve, batching on, in front of the Triton model with no batcher"),
            ]
        yield targets
    finally:
        for process in reversed(started):
            process.stop()


@contextlib.contextmanager
def scaling(
    workdir: Path, server_cpus: frozenset[int] | None = None, phase: Phase = _quiet_phase
) -> Iterator[list[Target]]:
    """One gateway per worker count of ``SCALING_WORKERS`` that fits in ``server_cpus`` (default:
    this process's CPUs), ``server.workers: N`` pinned to the first N of them, all serving the
    serving scenario's ONNX model without batching. Each is compared with ``workers-1``: N workers
    sharing the port should serve >= 0.8 x N times one. Give the load generator its own CPUs
    (``--client-cpus``) and enough of them (``--load-processes``), or it is what gets measured."""
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = sorted(server_cpus if server_cpus is not None else os.sched_getaffinity(0))
    started: list[_Process] = []
    try:
        model_path = LinearClassifier.random(seed=1).save(workdir / f"{MODEL}.onnx")
        targets = []
        for workers in (n for n in SCALING_WORKERS if n <= len(cpus)):
            config = gateway_config(model_path)
            config["server"] = dict(config["server"], workers=workers)
            gateway = GatewayProcess(config, workdir / f"workers-{workers}", name=f"gateway-{workers}")
            started.append(gateway)
            with phase(f"starting the gateway with {workers} worker(s)", 5.0), children_pinned_to(frozenset(cpus[:workers])):
                gateway.start()
            targets.append(Target(
                f"workers-{workers}", gateway.url, MODEL, compare_to="workers-1" if workers > 1 else "",
                pid=gateway.process.pid,
                description=f"infergate serve, server.workers: {workers} sharing one port (SO_REUSEPORT), pinned to "
                            f"CPUs {','.join(map(str, cpus[:workers]))}; auth off, one ONNX variant, batching off",
            ))
        yield targets
    finally:
        for process in reversed(started):
            process.stop()


@contextlib.contextmanager
def start_scenario(
    name: str, workdir: Path, with_triton: bool = False, server_cpus: frozenset[int] | None = None, phase: Phase = _quiet_phase
) -> Iterator[list[Target]]:
    """The servers of scenario ``name`` (one of ``SCENARIOS``), running for the duration of the block."""
    if name == "observability":
        from infergate.benchmarks.observability_scenario import observability

        with observability(workdir, server_cpus) as targets:
            yield targets
        return
    if name == "scaling":
        with scaling(workdir, server_cpus, phase) as targets:
            yield targets
        return
    if name != "serving":
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    with serving(workdir, with_triton, server_cpus, phase) as targets:
        yield targets

"""Lifecycle of a real ``infergate serve`` process: SIGTERM during load, signals when idle, no leaks.

What a client may see when the gateway is told to stop (SIGTERM) while it serves:
- a call the gateway had already taken in is finished within ``server.shutdown_grace_s`` and
  answered normally (the grace here is far longer than any call takes, so none is cut off);
- a call that arrives after the stop began is refused with UNAVAILABLE. During the drain the
  server still accepts calls and the inference servicer refuses them itself; once the drain is
  over and the server stops, or the process has exited, the client's channel reports UNAVAILABLE
  (GOAWAY, connection refused or reset). UNAVAILABLE is the retryable code: it tells a client, or
  the load balancer in front, to try another replica.
CANCELLED is what gRPC gives calls the server had received but not yet handed to a servicer when
it stops; the drain (refuse, wait for in-flight calls, wait for callers to go quiet, then stop)
exists so that callers do not see it, and DEADLINE_EXCEEDED would be a call that hung until the
client gave up. Both fail the test, as does any other code.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
import yaml
from tritonclient.utils import InferenceServerException

from infergate.gateway import __version__, metrics
from tests.conftest import running_gateway
from tests.e2e.conftest import (
    CLIENT_TIMEOUT_S,
    RAW_CALL_TIMEOUT_S,
    assert_matches_reference,
    assert_process_gone,
    assert_serves,
    inference_stub,
    linear_input,
    linear_request,
    result_outputs,
    result_variant,
    rows_for,
    triton_config,
)
from tests.support.processes import wait_until
from tests.support.scrape import requests_total, scrape

GRACE_S = 15.0
CALLERS = 48
EXIT_MARGIN_S = 30.0
"""Beyond the grace: closing backends and interpreter exit on a busy two-core machine."""


@dataclass(frozen=True)
class Outcome:
    caller: int
    started_after_sigterm: bool
    finished_after_sigterm: bool
    status: str
    """``OK`` or tritonclient's ``StatusCode.X``."""


async def test_sigterm_during_load_answers_or_refuses_every_call(gateway_process, triton_server, no_task_leaks):
    config = triton_config(triton_server.url, timeout_ms=60000)
    config["server"] = {"shutdown_grace_s": GRACE_S}
    gateway = gateway_process(config, name="sigterm-load")
    pid = gateway.process.pid

    channel = grpc.aio.insecure_channel(gateway.url)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    client = aioclient.InferenceServerClient(gateway.url)
    outcomes: list[Outcome] = []
    sigterm_sent = asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        first = await asyncio.wait_for(watch.read(), CLIENT_TIMEOUT_S)
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        async def caller(i: int) -> None:
            """Calls ``slow`` again and again until the gateway refuses one."""
            for n in range(10_000):
                x = rows_for(100_000 + i * 1000 + n, rows=1 + (i + n) % 3)
                after = sigterm_sent.is_set()
                try:
                    result = await client.infer("slow", [linear_input(x)], client_timeout=CLIENT_TIMEOUT_S)
                except InferenceServerException as exc:
                    outcomes.append(Outcome(i, after, sigterm_sent.is_set(), exc.status()))
                    return
                assert_matches_reference(result_outputs(result), x)
                assert result_variant(result) == "v1"
                outcomes.append(Outcome(i, after, sigterm_sent.is_set(), "OK"))

        tasks = [asyncio.create_task(caller(i)) for i in range(CALLERS)]
        # Real load first: every caller has had answers and all are waiting on the next one.
        for _ in range(600):
            if sum(o.status == "OK" for o in outcomes) >= 2 * CALLERS or any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.1)
        assert not any(t.done() for t in tasks), f"a caller stopped before SIGTERM: {outcomes[-5:]}"
        answered_before = len(outcomes)

        gateway.send(signal.SIGTERM)
        sigterm_sent.set()
        # Health turns NOT_SERVING at once (the Watch stream is a call in flight, so it hears it).
        shutting = await asyncio.wait_for(watch.read(), CLIENT_TIMEOUT_S)
        assert shutting.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ...and then the Watch ends cleanly: an open watcher must not hold the drain for the whole grace.
        assert await asyncio.wait_for(watch.read(), GRACE_S) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK

        # None hangs: every caller ends (refused) well within its own client timeout.
        await asyncio.wait_for(asyncio.gather(*tasks), GRACE_S + EXIT_MARGIN_S)
    finally:
        watch.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await channel.close()

    code = await asyncio.to_thread(gateway.wait, GRACE_S + EXIT_MARGIN_S)
    assert code == 0, gateway.output[-3000:]
    assert "shutting down" in gateway.output
    assert "Traceback" not in gateway.output

    statuses = {o.status for o in outcomes}
    assert statuses <= {"OK", "StatusCode.UNAVAILABLE"}, sorted(statuses)
    refusals = [o for o in outcomes if o.status != "OK"]
    assert sorted(o.caller for o in refusals) == list(range(CALLERS)), "each caller ends with exactly one refusal"
    assert all(o.finished_after_sigterm for o in refusals), "nothing was refused before SIGTERM"
    drained = [o for o in outcomes[answered_before:] if o.status == "OK" and not o.started_after_sigterm]
    # Every caller had one call in flight at SIGTERM; all but a rare one caught between two calls
    # had reached the gateway, and those must be answered within the grace period.
    assert len(drained) >= CALLERS // 2, f"only {len(drained)} of {CALLERS} in-flight calls were answered"
    gateway.stop()
    assert_process_gone(pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_gateway_exits_0_on_signal(gateway_process, onnx_gateway_config, signum):
    config = dict(onnx_gateway_config, server={"shutdown_grace_s": GRACE_S})
    gateway = gateway_process(config, name=f"idle-{signum}")
    pid = gateway.process.pid
    assert_serves(gateway.url)
    gateway.send(signum)
    assert gateway.wait(GRACE_S + EXIT_MARGIN_S) == 0
    assert "Traceback" not in gateway.output
    gateway.stop()
    assert_process_gone(pid)


def test_several_workers_share_the_port_and_one_scrape_counts_them_all(gateway_process, onnx_gateway_config, tmp_path):
    """workers: 2 -> two replicas on one port (SO_REUSEPORT); the supervisor's one metrics endpoint
    sums both workers' counters (prometheus-client multiprocess mode); SIGTERM stops all."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    config = dict(onnx_gateway_config, server={"workers": 2, "shutdown_grace_s": GRACE_S})
    gateway = gateway_process(config, name="workers", extra_env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    pid = gateway.process.pid
    wait_until(lambda: gateway.output.count("listening on port") == 2, 60.0, what="both workers listening")
    assert "cannot start" not in gateway.output
    metrics_port = int(re.search(r"supervising 2 workers, metrics_port (\d+)", gateway.output).group(1))
    configured = int(yaml.safe_load(gateway.config_path.read_text())["server"]["metrics_listen"].rsplit(":", 1)[1])
    assert metrics_port == configured
    calls = 40
    for _ in range(calls):  # a new connection each: the kernel spreads them over both workers
        assert_serves(gateway.url)
    refused = 10  # calls refused before routing count too, whichever worker refused them
    for _ in range(refused):
        with inference_stub(gateway.url) as stub, pytest.raises(grpc.RpcError) as unknown:
            stub.ModelInfer(linear_request(rows_for(1), model="no_such_model"), timeout=RAW_CALL_TIMEOUT_S)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # Both workers recorded calls (one counter file per process; the supervisor's own, holding only
    # label-less counters at 0, is not a worker's)...
    writers = {path.name for path in metrics_dir.glob("counter_*.db")} - {f"counter_{pid}.db"}
    assert len(writers) == 2, writers
    # ...and one scrape adds them up, with the new series and without _created ones. A worker
    # writes its call-path updates to its files every FLUSH_EVERY_S (gateway/metrics.py): the
    # scrape sees them within that.
    wait_until(
        lambda: requests_total(scrape(metrics_port), "linear", "v1", "OK") == calls,
        5 * metrics.FLUSH_EVERY_S + 2.0, what="both workers' deferred updates in the scrape",
    )
    samples = scrape(metrics_port)
    assert requests_total(samples, "linear", "v1", "OK") == calls
    assert requests_total(samples, "", "", "NOT_FOUND") == refused
    assert samples[("infergate_request_duration_seconds_count", (("model", "linear"), ("variant", "v1")))] == calls
    assert samples[("infergate_in_flight_requests", (("model", "linear"),))] == 0
    assert samples[("infergate_build_info", (("version", __version__),))] == 1
    assert not [name for name, _ in samples if name.endswith("_created")]
    gateway.send(signal.SIGTERM)
    assert gateway.wait(GRACE_S + EXIT_MARGIN_S) == 0
    assert gateway.output.count("shutting down") == 2
    assert "Traceback" not in gateway.output
    gateway.stop()
    assert_process_gone(pid)


def test_refuses_new_calls_after_it_has_exited(gateway_process, onnx_gateway_config):
    gateway = gateway_process(onnx_gateway_config, name="after-exit")
    url = gateway.url
    client = grpcclient.InferenceServerClient(url)
    try:
        assert client.is_server_ready()
        gateway.send(signal.SIGTERM)
        assert gateway.wait(GRACE_S + EXIT_MARGIN_S) == 0
        with pytest.raises(InferenceServerException) as err:
            client.infer("linear", [linear_input(rows_for(1))], client_timeout=CLIENT_TIMEOUT_S)
    finally:
        client.close()
    assert err.value.status() == "StatusCode.UNAVAILABLE"


def test_gateway_process_fixture_leaves_no_process(gateway_process, onnx_gateway_config):
    gateway = gateway_process(onnx_gateway_config, name="leak-check")
    pid = gateway.process.pid
    os.kill(pid, 0)  # alive now
    assert gateway.stop() == 0
    assert_process_gone(pid)


async def test_in_process_gateway_leaves_no_tasks_or_threads(onnx_gateway_config, no_task_leaks):
    threads_before = {t.ident for t in threading.enumerate()}
    async with running_gateway(onnx_gateway_config) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            x = rows_for(7)
            result = await client.infer("linear", [linear_input(x)], client_timeout=CLIENT_TIMEOUT_S)
        finally:
            await client.close()
        assert any(t.name.startswith("onnx-") for t in threading.enumerate())
    assert_matches_reference(result_outputs(result), x)
    assert not gateway.ready

    def onnx_threads_gone() -> bool:
        return not [t for t in threading.enumerate() if t.name.startswith("onnx-") and t.ident not in threads_before]

    await asyncio.to_thread(wait_until, onnx_threads_gone, 30.0, 0.05, "ONNX pool threads to exit")


async def test_stop_turns_health_not_serving_and_ends_watch_streams(onnx_gateway_config, no_task_leaks):
    """In process: once stop() begins a watcher hears NOT_SERVING, then its stream ends with OK."""
    async with running_gateway(onnx_gateway_config) as gateway:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        try:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="linear"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(gateway.stop(GRACE_S))
            assert (await asyncio.wait_for(watch.read(), CLIENT_TIMEOUT_S)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await asyncio.wait_for(watch.read(), GRACE_S) is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
            # With the watcher gone nothing is in flight: stop() returns without waiting out the grace.
            await asyncio.wait_for(stopping, GRACE_S + EXIT_MARGIN_S)
        finally:
            await channel.close()
    assert not gateway.ready


def test_a_worker_that_dies_takes_the_others_down(gateway_process, onnx_gateway_config):
    """workers: 2 and one worker killed: the service fails as a whole (exit 1), it does not run at half size."""
    config = dict(onnx_gateway_config, server={"workers": 2, "shutdown_grace_s": 2})
    gateway = gateway_process(config, name="worker-dies")
    wait_until(lambda: gateway.output.count("listening on port") == 2, 60.0, what="both workers listening")
    pid = gateway.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    workers = [int(child) for child in children if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text()]
    assert workers, children
    os.kill(workers[0], signal.SIGKILL)
    assert gateway.wait(GRACE_S + EXIT_MARGIN_S) == 1
    assert "worker exited with code -9; stopping the others" in gateway.output
    assert "Traceback" not in gateway.output
    gateway.stop()
    assert_process_gone(pid)


def test_metrics_port_taken_with_several_workers_fails_at_once(tmp_path, onnx_gateway_config):
    """The supervisor binds metrics_listen before it starts workers: a taken port is one clear error, exit 1."""
    import socket
    import subprocess
    import sys

    from infergate.gateway.local_redis import free_port

    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        config = dict(onnx_gateway_config, server={"workers": 2, "listen": f"127.0.0.1:{free_port()}",
                                                   "metrics_listen": f"127.0.0.1:{taken}", "shutdown_grace_s": 2})
        path = tmp_path / "workers.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "infergate", "serve", "--config", str(path)],
                              capture_output=True, text=True, timeout=GRACE_S + EXIT_MARGIN_S)
    finally:
        blocker.close()
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"cannot start: server.metrics_listen: cannot bind 127.0.0.1:{taken}" in output
    assert "listening on port" not in output
    assert "Traceback" not in output

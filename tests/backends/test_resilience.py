"""Circuit breaker, in-flight limit and retries.

The breaker runs on a ``FakeClock``, so ejection times are checked exactly and without sleeping.
``ResilientBackend`` is exercised around a recording fake (what it wraps is not what these tests
are about) and around a real ``TritonBackend`` pointed at a port where nothing listens.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from infergate.backends.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    ReadinessPoller,
    ResilientBackend,
    RetryPolicy,
    resilient,
)
from infergate.backends.triton import TritonBackend
from infergate.gateway.config import BreakerConfig, TritonBackendConfig
from infergate.gateway.errors import BackendUnavailable, DeadlineExceeded, GatewayError, Internal, InvalidArgument
from infergate.gateway.local_redis import free_port
from tests.router.fakes import FakeClock, RecordingBackend

pytestmark = pytest.mark.usefixtures("no_task_leaks")

INPUTS = {"INPUT": np.ones((2, 4), dtype=np.float32)}


def breaker(clock: FakeClock, name: str = "b", **config) -> CircuitBreaker:
    settings = {"consecutive_failures": 3, "base_ejection_s": 2.0, "max_ejection_s": 10.0, "half_open_probes": 1}
    settings.update(config)
    return CircuitBreaker(name, BreakerConfig(**settings), clock)


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert b.acquire()
        b.record_failure()


def breaker_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("infergate_breaker_open", {"backend": name})


# -- the breaker --------------------------------------------------------------------------------


def test_opens_after_consecutive_failures_and_refuses_until_the_ejection_ends():
    clock = FakeClock()
    b = breaker(clock, name="opens")
    fail(b, 2)
    assert b.state is BreakerState.CLOSED and b.accepting()
    fail(b, 1)
    assert b.state is BreakerState.OPEN
    assert not b.accepting() and not b.acquire()
    assert breaker_gauge("opens") == 1
    clock.advance(1.999)
    assert not b.acquire()
    clock.advance(0.001)
    assert b.state is BreakerState.HALF_OPEN


def test_a_success_resets_the_count_of_failures_in_a_row():
    b = breaker(FakeClock())
    fail(b, 2)
    assert b.acquire()
    b.record_success()
    fail(b, 2)
    assert b.state is BreakerState.CLOSED


def test_half_open_lets_only_the_probes_through_and_a_probe_success_closes_it():
    clock = FakeClock()
    b = breaker(clock, name="probe-ok", half_open_probes=2)
    fail(b, 3)
    clock.advance(2)
    assert b.acquire() and b.acquire()
    assert not b.acquire()  # both probes are out
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert breaker_gauge("probe-ok") == 0
    assert b.acquire()


def test_a_probe_failure_opens_again_for_twice_as_long_up_to_the_maximum():
    clock = FakeClock()
    b = breaker(clock, base_ejection_s=2.0, max_ejection_s=10.0)
    fail(b, 3)
    ejections = []
    for _ in range(4):
        ejections.append(b.open_until - clock())
        clock.advance(ejections[-1])
        assert b.acquire()  # the half-open probe
        b.record_failure()
    ejections.append(b.open_until - clock())
    assert ejections == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_repeated_ejections_double_but_a_long_healthy_stretch_starts_over():
    clock = FakeClock()
    b = breaker(clock, base_ejection_s=2.0, max_ejection_s=10.0)
    fail(b, 3)
    clock.advance(2)
    assert b.acquire()
    b.record_success()  # closed again after a 2 s ejection
    fail(b, 3)  # soon after: the next ejection is doubled
    assert b.open_until - clock() == 4.0
    clock.advance(4)
    assert b.acquire()
    b.record_success()
    clock.advance(10)  # healthy for max_ejection_s
    fail(b, 3)
    assert b.ejections == 1 and b.open_until - clock() == 2.0


def test_a_probe_released_without_a_verdict_frees_its_place():
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(2)
    assert b.acquire()
    assert not b.acquire()
    b.release()
    assert b.acquire()


# -- the resilient backend --------------------------------------------------------------------


async def started(inner, clock, b: CircuitBreaker | None = None, max_inflight: int = 4, retries: int = 2) -> ResilientBackend:
    backend = ResilientBackend(inner, b or breaker(clock), max_inflight, RetryPolicy(max_retries=retries, backoff_s=0.001), clock)
    await backend.start()
    return backend


async def test_unavailable_is_retried_at_most_twice_then_reported():
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.error = BackendUnavailable("connection refused")
    backend = await started(inner, clock, breaker(clock, consecutive_failures=10))
    with pytest.raises(BackendUnavailable) as err:
        await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(inner.calls) == 3


async def test_a_retry_that_succeeds_answers_the_call():
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.script = [BackendUnavailable("connection reset"), None]
    backend = await started(inner, clock)
    answer = await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)
    np.testing.assert_array_equal(answer["DOUBLE"], INPUTS["INPUT"] * 2)
    assert len(inner.calls) == 2
    assert backend.breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "error", [InvalidArgument("bad input"), Internal("model raised"), DeadlineExceeded("too slow")], ids=lambda error: type(error).__name__
)
async def test_anything_but_unavailable_is_never_retried(error: GatewayError):
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.error = error
    backend = await started(inner, clock)
    with pytest.raises(GatewayError) as err:
        await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)
    assert err.value.code == error.code
    assert len(inner.calls) == 1


async def test_no_retry_once_the_deadline_leaves_no_room():
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.error = BackendUnavailable("connection refused")
    backend = await started(inner, clock)
    with pytest.raises(BackendUnavailable):
        await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 0.0005)  # less than the 1 ms backoff
    assert len(inner.calls) == 1


async def test_an_open_breaker_fails_at_once_without_calling_the_backend():
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.error = BackendUnavailable("connection refused")
    backend = await started(inner, clock, breaker(clock, consecutive_failures=3), retries=2)
    with pytest.raises(BackendUnavailable):
        await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)
    assert backend.breaker.state is BreakerState.OPEN
    inner.error = None
    with pytest.raises(CircuitOpen) as err:
        await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(inner.calls) == 3
    clock.advance(2)  # ejection over: one probe goes through and closes the breaker
    await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)
    assert backend.breaker.state is BreakerState.CLOSED


async def test_error_answers_prove_the_backend_is_there_and_never_open_the_breaker():
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.error = Internal("this model always fails")
    backend = await started(inner, clock, breaker(clock, consecutive_failures=2))
    for _ in range(5):
        with pytest.raises(Internal):
            await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)
    assert backend.breaker.state is BreakerState.CLOSED


class CallerRanOut(RecordingBackend):
    """The caller's deadline passes while the backend works (the backend is not to blame)."""

    async def infer(self, model, inputs, outputs, deadline, headers=None):
        self._clock.advance(100)
        raise DeadlineExceeded("deadline exceeded at the backend")


async def test_the_backends_own_timeout_counts_as_a_failure_the_callers_deadline_does_not():
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.error = DeadlineExceeded("backend timeout_ms")
    backend = await started(inner, clock, breaker(clock, consecutive_failures=2))
    for _ in range(2):
        with pytest.raises(DeadlineExceeded):
            await backend.infer("m", INPUTS, ["DOUBLE"], clock() + 10)  # deadline still far
    assert backend.breaker.state is BreakerState.OPEN

    clock2 = FakeClock()
    backend2 = await started(CallerRanOut(clock2), clock2, breaker(clock2, consecutive_failures=2))
    for _ in range(3):
        with pytest.raises(DeadlineExceeded):
            await backend2.infer("m", INPUTS, ["DOUBLE"], clock2() + 10)
    assert backend2.breaker.state is BreakerState.CLOSED


async def test_in_flight_calls_are_capped_and_a_waiter_gives_up_at_its_deadline():
    clock = FakeClock()
    inner = RecordingBackend(clock)
    inner.hold = asyncio.Event()
    backend = ResilientBackend(inner, breaker(clock), max_inflight=1)  # real clock for the wait
    await backend.start()
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(backend.infer("m", INPUTS, ["DOUBLE"], loop.time() + 3600))
    while not inner.calls:
        await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded) as err:
        await backend.infer("m", INPUTS, ["DOUBLE"], backend._clock() + 0.05)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(inner.calls) == 1  # the second call never reached the backend
    assert backend.breaker.state is BreakerState.CLOSED  # waiting for a slot says nothing about the backend
    inner.hold.set()
    await first


async def test_a_real_triton_backend_with_nothing_listening_is_retried_then_ejected():
    config = TritonBackendConfig(
        kind="triton", url=f"127.0.0.1:{free_port()}", timeout_ms=2000,
        breaker=BreakerConfig(consecutive_failures=3, base_ejection_s=30),
    )
    backend = resilient(TritonBackend("nowhere", config), config)
    await backend.start()
    try:
        with pytest.raises(BackendUnavailable) as err:
            await backend.infer("linear_v1", {"INPUT": np.ones((1, 16), np.float32)}, ["SCORES"], backend._clock() + 10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        # 1 call + 2 retries = 3 failures in a row: ejected.
        assert backend.breaker.state is BreakerState.OPEN
        assert not await backend.ready("linear_v1")
    finally:
        await backend.close()


async def test_the_readiness_poller_reports_every_answer_and_stops_cleanly():
    answers = iter([True, False, True])
    seen: list[bool] = []
    done = asyncio.Event()

    async def probe() -> bool:
        return next(answers)

    def note(ready: bool) -> None:
        seen.append(ready)
        if len(seen) == 3:
            done.set()

    poller = ReadinessPoller(probe, 0.001, note)
    await poller.start()
    await asyncio.wait_for(done.wait(), 10)
    await poller.stop()
    assert seen == [True, False, True]

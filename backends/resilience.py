"""Backend resilience: a circuit breaker per backend, a cap on in-flight calls, bounded retries.

``ResilientBackend`` composes around any ``Backend`` (it is one itself) and is what variants and
batchers call. Each call:

1. asks the ``CircuitBreaker`` for a permit; while the breaker is open the call fails at once with
   ``CircuitOpen`` (a ``BackendUnavailable``), so the pipeline goes to the fallback variant without
   waiting for a timeout;
2. waits, within the call's deadline, for one of the backend's ``max_inflight_batches`` slots;
3. runs the inner backend and tells the breaker what happened;
4. retries only a ``BackendUnavailable`` (nothing was answered), at most ``RetryPolicy.max_retries``
   times, only while the deadline leaves room, never anything else (INVALID_ARGUMENT included).

The breaker follows Envoy's outlier detection in its ``consecutive_gateway_failure`` flavour: only
"the backend could not be reached" and "the backend's own timeout fired before the caller's
deadline" count as failures. An answer, even an error answer (a model raising, a rejected input),
proves the backend is there and counts as a success, so one broken model cannot eject a whole
Triton server. After ``consecutive_failures`` failures in a row the breaker opens for an ejection
time that starts at ``base_ejection_s`` and doubles with every ejection that follows within
``max_ejection_s`` of the last close, up to ``max_ejection_s``. When the time is over the breaker is
half open: ``half_open_probes`` calls go through; a success closes it, a failure opens it again.

Time comes from an injected ``clock`` so tests drive the breaker without sleeping.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infergate.backends.base import Backend, ModelSignature
from infergate.gateway import metrics
from infergate.gateway.config import BreakerConfig
from infergate.gateway.errors import BackendUnavailable, DeadlineExceeded, GatewayError

log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(BackendUnavailable):
    """The backend is ejected by its circuit breaker; the call was not attempted (never retried)."""


class CircuitBreaker:
    """Consecutive-failure circuit breaker of one backend; see the module docstring."""

    def __init__(self, name: str, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._config = config
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._ejections = 0
        self._open_until = 0.0
        self._closed_at = clock()
        self._probes = 0
        metrics.set_breaker_state(name, BreakerState.CLOSED.value)

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._state = BreakerState.HALF_OPEN
            self._probes = 0
            metrics.set_breaker_state(self.name, BreakerState.HALF_OPEN.value)
            log.info("backend %s: ejection over, breaker half open", self.name)
        return self._state

    @property
    def ejections(self) -> int:
        """Ejections in the current series (reset after ``max_ejection_s`` closed)."""
        return self._ejections

    @property
    def open_until(self) -> float:
        """When the current ejection ends, on the breaker's clock."""
        return self._open_until

    def accepting(self) -> bool:
        """Whether a call would be let through now (takes no permit)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and self._probes < self._config.half_open_probes

    def acquire(self) -> bool:
        """Take a permit for one call; False while open (or while half open with every probe out).

        A caller that got a permit must end it with exactly one of ``record_success``,
        ``record_failure`` or ``release``.
        """
        if not self.accepting():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._probes += 1
        return True

    def record_success(self) -> None:
        """The backend answered."""
        self._failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._close()

    def record_failure(self) -> None:
        """The backend could not be reached or timed out by itself."""
        if self._state is BreakerState.HALF_OPEN:
            self._open()
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._config.consecutive_failures:
                self._open()
        # OPEN: a straggler from before the ejection; the backend is already out.

    def release(self) -> None:
        """The call ended without a verdict on the backend (cancelled, the caller's deadline)."""
        if self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _open(self) -> None:
        now = self._clock()
        if self._state is BreakerState.CLOSED and now - self._closed_at >= self._config.max_ejection_s:
            self._ejections = 0  # a long healthy stretch forgives earlier ejections
        self._ejections += 1
        ejection_s = min(self._config.base_ejection_s * 2 ** (self._ejections - 1), self._config.max_ejection_s)
        self._state = BreakerState.OPEN
        self._open_until = now + ejection_s
        self._failures = 0
        self._probes = 0
        metrics.set_breaker_state(self.name, BreakerState.OPEN.value)
        log.warning("backend %s: breaker open for %.1fs (ejection %d)", self.name, ejection_s, self._ejections)

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._closed_at = self._clock()
        self._probes = 0
        metrics.set_breaker_state(self.name, BreakerState.CLOSED.value)
        log.info("backend %s: breaker closed", self.name)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that got no answer (``BackendUnavailable``)."""

    max_retries: int = 2
    """Extra attempts after the first; never more than 2."""
    backoff_s: float = 0.01
    """Wait before the first retry; doubled before each following one."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_retries <= 2:
            raise ValueError("max_retries must be between 0 and 2")


class ResilientBackend(Backend):
    """A backend behind a circuit breaker, an in-flight limit and a retry policy.

    It owns the inner backend's lifecycle: ``start`` starts it, ``close`` closes it.
    """

    def __init__(
        self,
        inner: Backend,
        breaker: CircuitBreaker,
        max_inflight: int,
        retry: RetryPolicy = RetryPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner.name, clock)
        self.inner = inner
        self.breaker = breaker
        self.max_inflight = max_inflight
        self.retry = retry
        self._slots: asyncio.Semaphore | None = None
        self._duration = metrics.BACKEND_DURATION.labels(inner.name).observe

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def span_attributes(self) -> Mapping[str, object]:
        return self.inner.span_attributes

    async def start(self) -> None:
        await self.inner.start()
        self._slots = asyncio.Semaphore(self.max_inflight)

    async def close(self) -> None:
        await self.inner.close()

    async def load(self, model: str) -> ModelSignature:
        return await self.inner.load(model)

    async def ready(self, model: str) -> bool:
        return await self.inner.ready(model)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        retries = 0
        while True:  # one attempt per turn; only a BackendUnavailable that is not CircuitOpen comes round again
            if self._slots is None:
                raise BackendUnavailable(f"backend {self.name} is not started")
            if not self.breaker.acquire():
                raise CircuitOpen(f"backend {self.name} is ejected (circuit breaker open)")
            verdict: Callable[[], None] = self.breaker.release
            try:
                await _acquire_before(self._slots, self.remaining_s(deadline), f"a free slot of backend {self.name}")
                started = time.perf_counter()
                try:
                    answer = await self.inner.infer(model, inputs, outputs, deadline, headers)
                    verdict = self.breaker.record_success
                    return answer
                except BackendUnavailable:
                    verdict = self.breaker.record_failure
                    backoff_s = self.retry.backoff_s * 2**retries
                    if retries >= self.retry.max_retries or self.remaining_s(deadline) <= backoff_s:
                        raise
                except DeadlineExceeded:
                    if self.remaining_s(deadline) > 0:  # the backend's own timeout, not the caller's
                        verdict = self.breaker.record_failure
                    raise
                except GatewayError:
                    verdict = self.breaker.record_success  # an answer, even an error, proves it is there
                    raise
                finally:
                    self._slots.release()
                    metrics.record(self._duration, time.perf_counter() - started)
            finally:
                verdict()
            retries += 1
            log.debug("backend %s: unavailable, retry %d in %.3fs", self.name, retries, backoff_s)
            await asyncio.sleep(backoff_s)


async def _acquire_before(semaphore: asyncio.Semaphore, timeout_s: float, what: str) -> None:
    """Acquire ``semaphore`` within ``timeout_s`` or raise DeadlineExceeded."""
    if timeout_s <= 0:
        raise DeadlineExceeded(f"deadline passed before {what}")
    if not semaphore.locked():  # a free slot: taken without suspending, no timer needed
        await semaphore.acquire()
        return
    try:
        async with asyncio.timeout(timeout_s):
            await semaphore.acquire()
    except TimeoutError as exc:
        raise DeadlineExceeded(f"deadline passed waiting for {what}") from exc


class ReadinessPoller:
    """Polls ``probe`` every ``interval_s`` and reports each answer to ``on_result``.

    The probe must never raise (``Backend.ready`` does not); one task, started in ``start`` and
    cancelled in ``stop``.
    """

    def __init__(self, probe: Callable[[], Awaitable[bool]], interval_s: float, on_result: Callable[[bool], None]) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._on_result = on_result
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="readiness-poller")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                ready = await self._probe()
            except Exception:  # a probe that breaks its promise must not kill the poller
                log.exception("readiness probe failed")
                ready = False
            self._on_result(ready)


def resilient(backend: Backend, config, clock: Callable[[], float] = time.monotonic) -> ResilientBackend:
    """``backend`` behind the breaker, in-flight limit and retries its config (triton or onnx) asks for.

    Only a Triton backend retries: ONNX Runtime runs in process and is never "unreachable".
    """
    retries = config.max_retries if config.kind == "triton" else 0
    return ResilientBackend(
        backend,
        CircuitBreaker(backend.name, config.breaker, clock),
        config.max_inflight_batches,
        RetryPolicy(max_retries=retries),
        clock,
    )

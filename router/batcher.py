"""The dynamic batcher of one variant: a ``Backend`` composed around the backend it batches for.

``Batcher(ResilientBackend(OnnxBackend))`` is what a batching variant calls. ``Batcher.infer``
queues one validated request and returns its own slice of a batched answer. Requests whose inputs
have the same names, dtypes and trailing shapes (the group key) are merged along the first axis.
A batch never mixes groups, and a batcher serves one variant of one model, so a batch never
mixes models or variants.

When a batch goes out (``BatchingConfig.dispatch``):

- ``idle`` (the default): as soon as one of the ``max_inflight`` backend slots is free, with
  everything queued (up to ``max_rows``). A caller that finds nothing queued and a slot free is
  sent at once from its own task, as one request: no queue, no dispatcher, no hand-off (the
  direct path, which costs what batching off costs). While every slot is busy, requests gather,
  so batches grow with the load and the backend's speed sets their size (Clipper's adaptive
  batching, "dispatch when the device is idle"). A backend whose runs finish inside the caller's
  step (an ONNX model run inline on the loop) never has a slot busy when the next caller comes,
  so every call takes the direct path: there is nothing for a batch to wait for.
- ``delay``: Triton's dynamic batcher. A group goes out when it holds ``max_rows`` rows or a
  preferred size, or ``max_delay_us`` after its oldest request arrived.

Promises:

- The inputs of a batch are concatenated once (``np.concatenate`` of the callers' zero-copy
  arrays) and every caller gets views of the answer cut at its row offsets.
- One future per request. When the backend call fails, every waiter of that batch gets the error.
  A waiter whose future is already done (the caller was cancelled or timed out) is skipped.
- At most ``max_queue`` rows wait; beyond that a request is refused at once with UNAVAILABLE.
  A request leaves the count the moment it is dispatched, dropped, cancelled or timed out.
- A caller's deadline ends its own call and no other. One timer per batcher, armed for the
  earliest deadline among the callers waiting (queued or in a batch at the backend), fails
  exactly the callers whose deadline has passed with DEADLINE_EXCEEDED. A queued request whose
  deadline has passed never reaches the backend. A batch is sent with the latest deadline of the
  callers still waiting for it, so a short-deadline batch-mate cannot cut the others' call short.

Tracing: given a tracer, a request whose caller's span is recording (sampled) gets an
``infergate/queue`` span for its wait, and each batch with such requests one ``infergate/backend``
span, a child of the first of them and linked to all of them; the backend call carries that
span's trace context.

Time comes from an injected ``clock``; the dispatcher's and the deadline timer's waits are
derived from it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from infergate.backends.base import Backend, ModelSignature
from infergate.gateway import metrics
from infergate.gateway.telemetry import BACKEND_SPAN, QUEUE_SPAN, outgoing_headers, stage_span
from infergate.gateway.config import BatchingConfig
from infergate.gateway.errors import DeadlineExceeded, GatewayError, Internal, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

GroupKey = tuple[tuple[str, str, tuple[int, ...]], ...]


def group_key(inputs: Mapping[str, np.ndarray]) -> GroupKey:
    """Requests with equal keys can be stacked along the first axis: names, dtypes, trailing shapes."""
    return tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items()))


class _Request:
    __slots__ = ("inputs", "outputs", "rows", "deadline", "headers", "key", "enqueued", "future", "queued", "span", "enqueued_ns")

    def __init__(self, inputs, outputs, rows, deadline, headers, key, enqueued, future, span=None) -> None:
        self.inputs: Mapping[str, np.ndarray] = inputs
        self.outputs: Sequence[str] = outputs
        self.rows: int = rows
        self.deadline: float = deadline
        self.headers: Mapping[str, str] | None = headers
        self.key: GroupKey = key
        self.enqueued: float = enqueued
        self.future: asyncio.Future = future
        self.queued = True
        """Counted in the queue depth; false once dispatched, dropped, cancelled or timed out."""
        self.span: trace.Span | None = span
        """The caller's span when it is recording (traced); None otherwise."""
        self.enqueued_ns = time.time_ns() if span is not None else 0


class Batcher(Backend):
    """Dynamic batching for one variant's ``target`` on ``inner``; ``start`` inside the loop, ``close`` on shutdown.

    ``inner`` is shared with other variants, so the batcher neither starts nor closes it.
    """

    def __init__(
        self,
        inner: Backend,
        target: str,
        config: BatchingConfig,
        *,
        max_rows: int,
        max_inflight: int,
        model: str = "",
        variant: str = "",
        clock: Callable[[], float] = time.monotonic,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """``max_rows`` is the largest batch (the config's, capped by the model's own limit);
        ``tracer`` the gateway's when tracing is on."""
        if max_rows < 1 or max_inflight < 1:
            raise ValueError("max_rows and max_inflight must be at least 1")
        super().__init__(inner.name, clock)
        self.inner = inner
        self._target = target
        self._max_rows = max_rows
        self._idle_dispatch = config.dispatch == "idle"
        self._max_delay_s = config.max_delay_us / 1e6
        self._max_queue = config.max_queue
        self._preferred = frozenset(size for size in config.preferred_batch_sizes if size <= max_rows)
        self._max_inflight = max_inflight
        self._depth_gauge = metrics.QUEUE_DEPTH.labels(model, variant)
        self._batch_size = metrics.BATCH_SIZE.labels(model, variant).observe
        self._queue_wait = metrics.QUEUE_WAIT.labels(model, variant).observe
        self._what = f"model {model} variant {variant}"
        self._tracer = tracer
        self._groups: dict[GroupKey, collections.deque[_Request]] = {}
        self._group_rows: dict[GroupKey, int] = {}
        self._depth = 0
        self._inflight = 0
        self._accepting = False
        self._waiting: set[_Request] = set()
        """Callers not answered yet (queued or in a batch at the backend), for the deadline timer."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline = float("inf")
        # asyncio objects are created in start(), inside the running loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def span_attributes(self) -> Mapping[str, object]:
        return self.inner.span_attributes

    @property
    def max_rows(self) -> int:
        return self._max_rows

    @property
    def depth(self) -> int:
        """Rows waiting now."""
        return self._depth

    @property
    def inflight(self) -> int:
        """Batches at the backend now."""
        return self._inflight

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name=f"batcher {self._what}")
        self._accepting = True

    async def close(self) -> None:
        """Refuse new requests, fail the queued ones with UNAVAILABLE, cancel batches still out."""
        self._accepting = False
        tasks = [t for t in (self._dispatcher, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for queue in self._groups.values():
            for request in queue:
                if request.queued:
                    self._unqueue(request)
                if not request.future.done():
                    request.future.set_exception(Unavailable(f"{self._what}: the gateway is shutting down"))
        self._groups.clear()
        self._group_rows.clear()

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
        """Queue one validated request for ``model`` (this batcher's target); return its outputs
        (views into the batch's answer)."""
        if not inputs:
            raise InvalidArgument("a batched request needs at least one input")
        rows = next(iter(inputs.values())).shape[0]
        if rows > self._max_rows:
            raise InvalidArgument(f"batch of {rows} rows is over {self._what}'s max_batch_size {self._max_rows}")
        now = self._clock()
        if deadline <= now:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if not self._accepting or self._loop is None:
            raise Unavailable(f"{self._what}: not accepting requests (starting or shutting down)")
        if self._idle_dispatch and not self._depth and self._inflight < self._max_inflight:
            return await self._direct(inputs, outputs, rows, deadline, headers)
        if self._depth + rows > self._max_queue:
            raise Unavailable(f"{self._what}: batch queue full ({self._depth} of {self._max_queue} rows waiting)")
        key = group_key(inputs)
        span = None
        if self._tracer is not None:
            span = trace.get_current_span()
            if not span.is_recording():
                span = None
        request = _Request(inputs, outputs, rows, deadline, headers, key, now, self._loop.create_future(), span)
        queue = self._groups.get(key)
        if queue is None:
            queue = self._groups[key] = collections.deque()
            self._group_rows[key] = 0
        queue.append(request)
        self._group_rows[key] += rows
        self._depth += rows
        self._depth_gauge.set(self._depth)
        self._waiting.add(request)
        if deadline < self._timer_deadline:
            self._arm_timer(deadline, now)
        self._wakeup.set()  # type: ignore[union-attr]
        try:
            return await request.future
        finally:
            self._waiting.discard(request)
            if request.queued:  # cancelled or timed out before dispatch: free its place now
                self._unqueue(request)

    # -- deadlines -----------------------------------------------------------------------------

    def _arm_timer(self, deadline: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_deadline = deadline
        self._timer = self._loop.call_later(max(deadline - now, 0.0), self._expire)  # type: ignore[union-attr]

    def _expire(self) -> None:
        """The earliest deadline is due: fail every caller whose deadline has passed, re-arm for the next."""
        self._timer = None
        now = self._clock()
        # The timer fired, so its deadline has passed even on a clock that has not moved (tests).
        due = max(now, self._timer_deadline)
        self._timer_deadline = float("inf")
        earliest = float("inf")
        for request in list(self._waiting):
            if request.deadline <= due:
                self._waiting.discard(request)
                where = "in the batch queue" if request.queued else "for the backend"
                if request.queued:
                    self._unqueue(request)
                if not request.future.done():
                    request.future.set_exception(DeadlineExceeded(f"deadline passed while waiting {where} ({self._what})"))
            elif request.deadline < earliest:
                earliest = request.deadline
        if earliest != float("inf"):
            self._arm_timer(earliest, now)

    # -- dispatch ------------------------------------------------------------------------------

    def _unqueue(self, request: _Request) -> None:
        request.queued = False
        self._depth -= request.rows
        self._group_rows[request.key] -= request.rows
        self._depth_gauge.set(self._depth)

    async def _dispatch_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            self._inflight += 1
            task = asyncio.create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _next_batch(self) -> list[_Request]:
        """The next batch, once a group is due and a backend slot is free. Requests keep gathering
        while every slot is busy, so the next batch takes all of them."""
        assert self._wakeup is not None
        while True:
            key, wait_s = self._due_group()
            if key is not None and wait_s <= 0 and self._inflight < self._max_inflight:
                batch = self._take(key)
                if batch:
                    return batch
                continue  # everything taken had expired or gone
            self._wakeup.clear()
            if key is None or wait_s <= 0:  # nothing queued, or every slot busy: a slot or a request wakes us
                await self._wakeup.wait()
                continue
            try:
                async with asyncio.timeout(wait_s):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _slot_freed(self) -> None:
        self._inflight -= 1
        if self._depth and self._wakeup is not None:
            self._wakeup.set()

    def _due_group(self) -> tuple[GroupKey | None, float]:
        """The group to send next and the seconds until it is due (<= 0: now); drops empty groups.

        With idle dispatch every group is due at once; the oldest goes first. With delay
        dispatch a group is due at once when it holds ``max_rows`` rows or a preferred size, else
        ``max_delay_us`` after its oldest live request arrived; of several, the earliest due wins.
        """
        best: tuple[bool, float, GroupKey] | None = None  # (waiting out its delay, due, key)
        for key in list(self._groups):
            queue = self._groups[key]
            while queue and not queue[0].queued:
                queue.popleft()
            if not queue:
                del self._groups[key]
                del self._group_rows[key]
                continue
            if self._idle_dispatch:
                waiting = False
            else:
                rows = self._group_rows[key]
                waiting = rows < self._max_rows and rows not in self._preferred
            due = queue[0].enqueued + (self._max_delay_s if waiting else 0.0)
            if best is None or (waiting, due) < best[:2]:
                best = (waiting, due, key)
        if best is None:
            return None, 0.0
        waiting, due, key = best
        return key, (due - self._clock()) if waiting else 0.0

    def _take(self, key: GroupKey) -> list[_Request]:
        """Remove up to ``max_rows`` rows of live requests from the front of a group."""
        queue = self._groups[key]
        now = self._clock()
        batch: list[_Request] = []
        rows = 0
        while queue:
            request = queue[0]
            if request.queued and rows + request.rows > self._max_rows:
                break
            queue.popleft()
            if not request.queued:
                continue
            self._unqueue(request)
            if request.future.done():
                continue
            if request.deadline <= now:
                request.future.set_exception(DeadlineExceeded("deadline passed in the batch queue"))
                continue
            batch.append(request)
            rows += request.rows
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        """Send one batch and hand every live waiter its rows (or the batch's error)."""
        try:
            now = self._clock()
            for request in batch:
                metrics.record(self._queue_wait, max(now - request.enqueued, 0.0))
            live = [r for r in batch if not r.future.done()]
            if not live:
                return
            rows = sum(r.rows for r in live)
            metrics.record(self._batch_size, rows)
            traced = [r for r in live if r.span is not None] if self._tracer is not None else None
            try:
                if traced:
                    answer = await self._traced_call(live, traced, rows)
                else:
                    answer = await self.inner.infer(
                        self._target, _concatenate(live), _union(live), max(r.deadline for r in live), live[0].headers
                    )
                _split(live, answer, rows)
            except asyncio.CancelledError:
                _fail(live, Unavailable(f"{self._what}: the gateway is shutting down"))
                raise
            except GatewayError as exc:
                _fail(live, exc)
            except Exception as exc:
                log.exception("batch of %s failed", self._what)
                _fail(live, Internal("internal error while serving the batch"), exc)
        finally:
            self._slot_freed()


    async def _traced_call(self, live: list[_Request], traced: list[_Request], rows: int) -> dict[str, np.ndarray]:
        """The backend call of a batch with traced requests: their queue spans, one linked backend span."""
        assert self._tracer is not None
        dispatched_ns = time.time_ns()
        for request in traced:
            stage_span(self._tracer, QUEUE_SPAN, request.enqueued_ns, dispatched_ns, parent=request.span)
        with self._backend_span([r.span for r in traced], rows, len(live)):  # type: ignore[misc]
            return await self.inner.infer(
                self._target, _concatenate(live), _union(live), max(r.deadline for r in live), outgoing_headers()
            )

    def _backend_span(self, callers: Sequence[trace.Span], rows: int, requests: int):
        """The one backend span of a batch: a child of the first traced caller, linked to each of them."""
        assert self._tracer is not None
        return self._tracer.start_as_current_span(
            BACKEND_SPAN,
            context=trace.set_span_in_context(callers[0]),
            kind=SpanKind.CLIENT,
            links=[Link(span.get_span_context()) for span in callers],
            attributes={
                "infergate.backend.kind": self.inner.kind,
                "infergate.backend.name": self.inner.name,
                "infergate.backend.target": self._target,
                "infergate.batch.rows": rows,
                "infergate.batch.requests": requests,
                **self.inner.span_attributes,
            },
        )

    async def _direct(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        deadline: float,
        headers: Mapping[str, str] | None,
    ) -> dict[str, np.ndarray]:
        """Idle dispatch with nothing queued and a slot free: this request alone, from the caller's
        own task, on the caller's own deadline (what a batch of one would be, without the hand-off)."""
        self._inflight += 1
        try:
            metrics.record(self._queue_wait, 0.0)
            metrics.record(self._batch_size, rows)
            span = trace.get_current_span() if self._tracer is not None else None
            try:
                if span is not None and span.is_recording():
                    with self._backend_span([span], rows, 1):
                        answer = await self.inner.infer(self._target, inputs, outputs, deadline, outgoing_headers())
                else:
                    answer = await self.inner.infer(self._target, inputs, outputs, deadline, headers)
            except (GatewayError, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.exception("request to %s failed", self._what)
                raise Internal("internal error while serving the batch") from exc
            _check_rows(answer, rows)
            return answer
        finally:
            self._slot_freed()


def _concatenate(requests: Sequence[_Request]) -> dict[str, np.ndarray]:
    if len(requests) == 1:
        return dict(requests[0].inputs)
    return {name: np.concatenate([r.inputs[name] for r in requests], axis=0) for name in requests[0].inputs}


def _union(requests: Sequence[_Request]) -> list[str]:
    if len(requests) == 1:
        return list(requests[0].outputs)
    names: dict[str, None] = {}
    for request in requests:
        names.update(dict.fromkeys(request.outputs))
    return list(names)


def _split(requests: Sequence[_Request], answer: Mapping[str, np.ndarray], rows: int) -> None:
    _check_rows(answer, rows)
    if len(requests) == 1:
        request = requests[0]
        if not request.future.done():
            request.future.set_result({name: answer[name] for name in request.outputs})
        return
    offset = 0
    for request in requests:
        end = offset + request.rows
        if not request.future.done():
            request.future.set_result({name: answer[name][offset:end] for name in request.outputs})
        offset = end


def _check_rows(answer: Mapping[str, np.ndarray], rows: int) -> None:
    for name, array in answer.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise Internal(f"backend returned {name} with shape {list(array.shape)} for a batch of {rows} rows")


def _fail(requests: Sequence[_Request], error: GatewayError, cause: BaseException | None = None) -> None:
    if cause is not None:
        error.__cause__ = cause
    for request in requests:
        if not request.future.done():
            request.future.set_exception(error)

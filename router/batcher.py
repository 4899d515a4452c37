"""The dynamic batcher of one variant, composed around its backend (Triton's dynamic batcher, in-gateway).

``Batcher.infer`` queues one validated request and returns its own slice of a batched answer.
Requests whose inputs have the same names, dtypes and trailing shapes (the group key) are merged
along the first axis until ``max_rows`` rows are queued, or a preferred size is reached, or
``max_delay_us`` has passed since the oldest of them arrived. A batch never mixes groups, and a
batcher serves one variant of one model, so a batch never mixes models or variants.

Promises:

- The inputs of a batch are concatenated once (``np.concatenate`` of the callers' zero-copy
  arrays) and every caller gets views of the answer cut at its row offsets.
- One future per request. When the backend call fails, every waiter of that batch gets the error.
  A waiter whose future is already done (the caller was cancelled or timed out) is skipped.
- At most ``max_queue`` rows wait; beyond that a request is refused at once with UNAVAILABLE.
  A request leaves the count the moment it is dispatched, dropped, cancelled or timed out.
- A request whose deadline has passed is dropped before dispatch with DEADLINE_EXCEEDED and never
  reaches the backend; the backend call gets the tightest deadline of the batch.
- At most ``max_inflight`` batches are at the backend at once; while they are all out, requests
  keep queueing and the next batch is larger (the backend's speed sets the batch size).

Time comes from an injected ``clock``; the dispatcher's waits are derived from it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from infergate.backends.base import Backend
from infergate.gateway import metrics
from infergate.gateway.config import BatchingConfig
from infergate.gateway.errors import DeadlineExceeded, GatewayError, Internal, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

GroupKey = tuple[tuple[str, str, tuple[int, ...]], ...]


def group_key(inputs: Mapping[str, np.ndarray]) -> GroupKey:
    """Requests with equal keys can be stacked along the first axis: names, dtypes, trailing shapes."""
    return tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items()))


@dataclass(eq=False)
class _Request:
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    rows: int
    deadline: float
    headers: Mapping[str, str] | None
    key: GroupKey
    enqueued: float
    future: asyncio.Future = field(repr=False)
    queued: bool = True
    """Counted in the queue depth; false once dispatched, dropped, cancelled or timed out."""


class Batcher:
    """Dynamic batching for one variant; ``start`` inside the loop, ``stop`` on shutdown."""

    def __init__(
        self,
        backend: Backend,
        target: str,
        config: BatchingConfig,
        *,
        max_rows: int,
        max_inflight: int,
        model: str = "",
        variant: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_rows`` is the largest batch (the config's, capped by the model's own limit)."""
        if max_rows < 1 or max_inflight < 1:
            raise ValueError("max_rows and max_inflight must be at least 1")
        self._backend = backend
        self._target = target
        self._max_rows = max_rows
        self._max_delay_s = config.max_delay_us / 1e6
        self._max_queue = config.max_queue
        self._preferred = frozenset(size for size in config.preferred_batch_sizes if size <= max_rows)
        self._max_inflight = max_inflight
        self._clock = clock
        self._depth_gauge = metrics.QUEUE_DEPTH.labels(model, variant)
        self._batch_size = metrics.BATCH_SIZE.labels(model, variant)
        self._queue_wait = metrics.QUEUE_WAIT.labels(model, variant)
        self._what = f"model {model} variant {variant}"
        self._groups: dict[GroupKey, collections.deque[_Request]] = {}
        self._group_rows: dict[GroupKey, int] = {}
        self._depth = 0
        self._inflight = 0
        self._accepting = False
        # asyncio objects are created in start(), inside the running loop.
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()

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
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name=f"batcher {self._what}")
        self._accepting = True

    async def stop(self) -> None:
        """Refuse new requests, fail the queued ones with UNAVAILABLE, cancel batches still out."""
        self._accepting = False
        tasks = [t for t in (self._dispatcher, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None
        for queue in self._groups.values():
            for request in queue:
                if request.queued:
                    self._unqueue(request)
                if not request.future.done():
                    request.future.set_exception(Unavailable(f"{self._what}: the gateway is shutting down"))
        self._groups.clear()
        self._group_rows.clear()

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue one validated request; return its outputs (views into the batch's answer)."""
        if not inputs:
            raise InvalidArgument("a batched request needs at least one input")
        rows = next(iter(inputs.values())).shape[0]
        if rows > self._max_rows:
            raise InvalidArgument(f"batch of {rows} rows is over {self._what}'s max_batch_size {self._max_rows}")
        now = self._clock()
        if deadline <= now:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if not self._accepting or self._wakeup is None:
            raise Unavailable(f"{self._what}: not accepting requests (starting or shutting down)")
        if self._depth + rows > self._max_queue:
            raise Unavailable(f"{self._what}: batch queue full ({self._depth} of {self._max_queue} rows waiting)")
        key = group_key(inputs)
        future = asyncio.get_running_loop().create_future()
        request = _Request(inputs, outputs, rows, deadline, headers, key, now, future)
        self._groups.setdefault(key, collections.deque()).append(request)
        self._group_rows[key] = self._group_rows.get(key, 0) + rows
        self._depth += rows
        self._depth_gauge.set(self._depth)
        self._wakeup.set()
        try:
            async with asyncio.timeout(deadline - now):
                return await future
        except TimeoutError as exc:
            raise DeadlineExceeded(f"deadline passed while waiting for a batch of {self._what}") from exc
        finally:
            if request.queued:  # cancelled or timed out before dispatch: free its place now
                self._unqueue(request)

    # -- dispatch ------------------------------------------------------------------------------

    def _unqueue(self, request: _Request) -> None:
        request.queued = False
        self._depth -= request.rows
        self._group_rows[request.key] -= request.rows
        self._depth_gauge.set(self._depth)

    async def _dispatch_forever(self) -> None:
        assert self._slots is not None
        while True:
            # Hold a backend slot before forming a batch, so requests keep gathering while every
            # slot is busy and the next batch takes all of them.
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            self._inflight += 1
            task = asyncio.create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _next_batch(self) -> list[_Request]:
        assert self._wakeup is not None
        while True:
            key, wait_s = self._due_group()
            if key is not None and wait_s <= 0:
                batch = self._take(key)
                if batch:
                    return batch
                continue  # everything taken had expired or gone
            self._wakeup.clear()
            try:
                async with asyncio.timeout(wait_s if key is not None else None):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _due_group(self) -> tuple[GroupKey | None, float]:
        """The group to send next and the seconds until it is due (<= 0: now); drops empty groups.

        A group is due at once when it holds ``max_rows`` rows or a preferred size, else
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
        assert self._slots is not None
        try:
            now = self._clock()
            for request in batch:
                self._queue_wait.observe(max(now - request.enqueued, 0.0))
            live = [r for r in batch if not r.future.done()]
            if not live:
                return
            rows = sum(r.rows for r in live)
            self._batch_size.observe(rows)
            try:
                answer = await self._backend.infer(
                    self._target,
                    _concatenate(live),
                    _union(r.outputs for r in live),
                    min(r.deadline for r in live),
                    live[0].headers,
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
            self._inflight -= 1
            self._slots.release()


def _concatenate(requests: Sequence[_Request]) -> dict[str, np.ndarray]:
    if len(requests) == 1:
        return dict(requests[0].inputs)
    return {name: np.concatenate([r.inputs[name] for r in requests], axis=0) for name in requests[0].inputs}


def _union(outputs_per_request) -> list[str]:
    names: dict[str, None] = {}
    for outputs in outputs_per_request:
        names.update(dict.fromkeys(outputs))
    return list(names)


def _split(requests: Sequence[_Request], answer: Mapping[str, np.ndarray], rows: int) -> None:
    for name, array in answer.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise Internal(f"backend returned {name} with shape {list(array.shape)} for a batch of {rows} rows")
    offset = 0
    for request in requests:
        end = offset + request.rows
        if not request.future.done():
            request.future.set_result({name: answer[name][offset:end] for name in request.outputs})
        offset = end


def _fail(requests: Sequence[_Request], error: GatewayError, cause: BaseException | None = None) -> None:
    if cause is not None:
        error.__cause__ = cause
    for request in requests:
        if not request.future.done():
            request.future.set_exception(error)

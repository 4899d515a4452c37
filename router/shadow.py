"""Shadow traffic: copies of live calls sent to a model's shadow variant, answers compared, never returned.

``shadow.percent`` of a model's successful live calls are offered after the live answer is ready;
the copy goes into a bounded queue (``shadow.max_pending``) and the call returns at once. A full
queue drops the copy and counts it (``infergate_shadow_requests{outcome="dropped"}``, one warning
per model). A few worker tasks per model run the copies on the shadow variant with their own
deadline and compare each answer with the live one:

- ``infergate_shadow_divergence{model,variant}``: the largest absolute difference over every output;
- ``infergate_shadow_requests{model,variant,outcome}``: ``agree`` when every output with a class
  axis (floating point, two or more dimensions) has the same argmax in every row and every other
  output is equal within float tolerance, ``differ`` otherwise, ``error`` when the shadow call
  failed, ``dropped`` when it was never made.

A call already served by the shadow variant is not copied.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from infergate.gateway import metrics
from infergate.gateway.config import ShadowConfig

log = logging.getLogger(__name__)

WORKERS_PER_MODEL = 4
"""Shadow calls of one model in flight at once."""


class ShadowTarget(Protocol):
    """What the dispatcher needs of a variant: ``gateway.pipeline.Variant`` is one."""

    name: str

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], deadline: float
    ) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class _Copy:
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    live: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    agree: bool


def compare(live: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> Comparison:
    """Max absolute difference over the outputs both answers have, and whether they agree."""
    worst = 0.0
    agree = True
    for name, ours in live.items():
        theirs = shadow.get(name)
        if theirs is None or theirs.shape != ours.shape:
            return Comparison(float("inf"), False)
        if ours.dtype.kind not in "fiub" or theirs.dtype.kind not in "fiub":
            agree = agree and bool(np.array_equal(ours, theirs))
            continue
        if ours.size:
            worst = max(worst, float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)))))
        if ours.dtype.kind == "f" and ours.ndim >= 2 and ours.shape[-1] > 1:
            agree = agree and bool(np.array_equal(ours.argmax(axis=-1), theirs.argmax(axis=-1)))
        else:
            agree = agree and bool(np.allclose(ours, theirs, rtol=1e-5, atol=1e-6))
    return Comparison(worst, agree)


class _ModelShadow:
    def __init__(self, model: str, config: ShadowConfig, target: ShadowTarget) -> None:
        self.model = model
        self.config = config
        self.target = target
        self.threshold = config.percent / 100.0
        self.queue: asyncio.Queue[_Copy] = asyncio.Queue(maxsize=config.max_pending)
        self.dropped_logged = False


class ShadowDispatcher:
    """Holds a bounded queue and workers per model with a ``shadow`` block. Start and stop in the loop."""

    def __init__(
        self,
        timeout_s: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout_s = timeout_s
        self._random = (rng or random.Random()).random
        self._clock = clock
        self._targets: dict[str, tuple[ShadowConfig, ShadowTarget]] = {}
        self._models: dict[str, _ModelShadow] = {}
        self._tasks: set[asyncio.Task] = set()

    def add(self, model: str, config: ShadowConfig, target: ShadowTarget) -> None:
        """Shadow ``model`` onto ``target``; call before ``start``."""
        self._targets[model] = (config, target)

    async def start(self) -> None:
        for model, (config, target) in self._targets.items():
            shadow = self._models[model] = _ModelShadow(model, config, target)
            for index in range(min(WORKERS_PER_MODEL, config.max_pending)):
                task = asyncio.create_task(self._work(shadow), name=f"infergate-shadow-{model}-{index}")
                self._tasks.add(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._models.clear()

    def offer(
        self,
        model: str,
        variant: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        live: Mapping[str, np.ndarray],
    ) -> None:
        """Maybe queue a copy of a served call; never blocks, never raises."""
        shadow = self._models.get(model)
        if shadow is None or variant == shadow.target.name or self._random() >= shadow.threshold:
            return
        try:
            shadow.queue.put_nowait(_Copy(inputs, outputs, live))
        except asyncio.QueueFull:
            metrics.SHADOW_REQUESTS.labels(model, shadow.target.name, "dropped").inc()
            if not shadow.dropped_logged:
                shadow.dropped_logged = True
                log.warning("shadow queue of %s full (%d); dropping copies", model, shadow.config.max_pending)

    def pending(self, model: str) -> int:
        shadow = self._models.get(model)
        return shadow.queue.qsize() if shadow is not None else 0

    async def _work(self, shadow: _ModelShadow) -> None:
        variant = shadow.target.name
        while True:
            copy = await shadow.queue.get()
            try:
                answer = await shadow.target.infer(copy.inputs, copy.outputs, self._clock() + self._timeout_s)
                result = compare(copy.live, answer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.SHADOW_REQUESTS.labels(shadow.model, variant, "error").inc()
                log.debug("shadow call of %s on %s failed: %s", shadow.model, variant, exc)
                continue
            finally:
                shadow.queue.task_done()
            metrics.SHADOW_DIVERGENCE.labels(shadow.model, variant).observe(result.max_abs_diff)
            metrics.SHADOW_REQUESTS.labels(shadow.model, variant, "agree" if result.agree else "differ").inc()

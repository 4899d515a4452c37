"""Fakes for what the router and backend unit tests are not about: time and a model server.

``RecordingBackend`` implements the real ``Backend`` interface and records every call it gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infergate.backends.base import Backend, ModelSignature, TensorSpec
from infergate.gateway.errors import GatewayError


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Call:
    rows: int
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    deadline: float


class RecordingBackend(Backend):
    """Answers ``DOUBLE = INPUT * 2`` and ``ROWSUM`` (sum of each row); records each call.

    ``hold`` (an Event) keeps calls waiting until it is set; ``script`` is a list of outcomes
    consumed one per call (an error to raise, or None to answer); once it is empty, ``error``
    (when set) fails every call.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        super().__init__("fake", clock or FakeClock())
        self.calls: list[Call] = []
        self.hold: asyncio.Event | None = None
        self.error: GatewayError | None = None
        self.script: list[GatewayError | None] = []
        self.wrong_rows = False

    @property
    def kind(self) -> str:
        return "fake"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def load(self, model: str) -> ModelSignature:
        spec = TensorSpec("INPUT", "FP32", (-1, -1))
        return ModelSignature((spec,), (TensorSpec("DOUBLE", "FP32", (-1, -1)),), batched=True)

    async def ready(self, model: str) -> bool:
        return True

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        x = inputs["INPUT"]
        self.calls.append(Call(x.shape[0], dict(inputs), list(outputs), deadline))
        if self.hold is not None:
            await self.hold.wait()
        error = self.script.pop(0) if self.script else self.error
        if error is not None:
            raise error
        if self.wrong_rows:
            x = x[:-1]
        answer = {"DOUBLE": x * 2, "ROWSUM": x.reshape(x.shape[0], -1).sum(axis=1)}
        return {name: answer[name] for name in outputs}

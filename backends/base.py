"""The Backend interface: one small async ABC for everything that runs a model.

A backend is a connection-like resource (a Triton channel, an ONNX Runtime thread pool) that can
serve several models. ``load`` prepares one model and returns its signature; ``infer`` runs a
batch. Backends translate their own failures into ``gateway.errors`` at this edge, keeping the
cause (``raise ... from exc``): BackendUnavailable when the backend cannot be reached (safe to retry
or fall back), InvalidArgument when it rejects the input, DeadlineExceeded when time ran out,
Internal for the rest.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: Triton datatype and shape, ``-1`` for a dimension of any size.

    For a batched model (``ModelSignature.batched``) the first dimension is the batch dimension.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Other (datatype, shape) pairs a caller may send for this input (the gateway's entity ids)."""


@dataclass(frozen=True)
class ModelSignature:
    """What a model takes and returns."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool
    """True when every input and output has a leading batch dimension rows can be stacked along."""
    max_batch_size: int = 0
    """Largest batch the model accepts; 0 means no limit of its own."""
    platform: str = ""

    def input(self, name: str) -> TensorSpec | None:
        return self.input_specs.get(name)

    def output(self, name: str) -> TensorSpec | None:
        return self.output_specs.get(name)

    # Lookups built on first use and kept (the signature is frozen): a request is checked against
    # them on every call.
    @cached_property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        """Inputs by name (the first one where a name repeats)."""
        return _by_name(self.inputs)

    @cached_property
    def output_specs(self) -> Mapping[str, TensorSpec]:
        """Outputs by name (the first one where a name repeats)."""
        return _by_name(self.outputs)

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        """Every output's name, in order."""
        return tuple(spec.name for spec in self.outputs)


def _by_name(specs: Sequence[TensorSpec]) -> dict[str, TensorSpec]:
    found: dict[str, TensorSpec] = {}
    for spec in specs:
        found.setdefault(spec.name, spec)
    return found


class Backend(abc.ABC):
    """Runs models. Create asyncio resources in ``start``, release them in ``close``."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """``onnx`` or ``triton``: the label used in metrics."""

    @property
    def span_attributes(self) -> Mapping[str, object]:
        """OpenTelemetry attributes of the backend span of a call here: the RPC semantic
        conventions (``rpc.*``, ``server.address``, ``server.port``) for a remote backend, none for
        one in process. Built once; only traced calls read it."""
        return {}

    @abc.abstractmethod
    async def start(self) -> None:
        """Open connections and pools; called once inside the running loop."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything ``start`` and ``load`` acquired; safe to call twice."""

    @abc.abstractmethod
    async def load(self, model: str) -> ModelSignature:
        """Make ``model`` (a Triton model name, an ONNX path) ready; return its signature."""

    @abc.abstractmethod
    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one (possibly batched) request and return the requested outputs by name.

        ``deadline`` is absolute, on this backend's clock (``time.monotonic`` by default); the
        backend never waits past it. ``headers`` are passed on where the backend has a wire
        (trace context).
        """

    @abc.abstractmethod
    async def ready(self, model: str) -> bool:
        """Whether ``model`` can serve now; never raises."""

    def remaining_s(self, deadline: float) -> float:
        """Seconds left before ``deadline``; may be negative."""
        return deadline - self._clock()

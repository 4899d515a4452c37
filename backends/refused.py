"""A stand-in for a model whose file the gateway refused to load (its digest is not the configured one).

The variant stays in its route so that the refusal is visible where operators look: it is never
ready (ModelReady, the per-model health service, the admin route's ``health``), and a call routed to
it goes to its fallback or fails with UNAVAILABLE and the reason, as for any backend that is down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from infergate.backends.base import Backend, ModelSignature
from infergate.gateway.errors import BackendUnavailable


class RefusedModel(Backend):
    """Serves nothing and says why; ``name`` and ``kind`` are those of the backend that refused."""

    def __init__(self, backend: Backend, reason: str) -> None:
        super().__init__(backend.name)
        self._kind = backend.kind
        self.reason = reason

    @property
    def kind(self) -> str:
        return self._kind

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def load(self, model: str) -> ModelSignature:
        raise BackendUnavailable(self.reason)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        raise BackendUnavailable(self.reason)

    async def ready(self, model: str) -> bool:
        return False

"""Admission by memory: a budget for the bytes of requests in flight.

Every request message is held in memory from the moment grpc hands it over until its call ends,
and decoding and batching copy it. Without a bound, 48 concurrent 60 MB calls took a gateway to
7.9 GB. ``MemoryBudget`` counts the wire size of the requests being served; a request that would
take the total past ``server.max_inflight_request_bytes`` is refused at once with
RESOURCE_EXHAUSTED, before it is decoded, so its memory is given back immediately. A single
request larger than the whole budget is always refused; ``max_message_bytes`` bounds it anyway.

Unary calls are admitted at the decoding seam (``gateway/wire.py``) for every RPC; each message of
a ``ModelStreamInfer`` stream is admitted by the servicer and held until its answer is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

from infergate.gateway import metrics
from infergate.gateway.errors import ResourceExhausted

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 64 << 20
"""Once this many request bytes have come and gone and none is in flight, heap memory is handed back."""

OVER_BUDGET_MESSAGE = "the gateway holds too many request bytes in flight; retry shortly or send smaller requests"


class MemoryBudget:
    """Bytes of requests in flight, at most ``limit_bytes`` (0: no limit)."""

    def __init__(self, limit_bytes: int, trim: Callable[[], None] | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.in_use = 0
        self._released_since_trim = 0
        self._trim = trim if trim is not None else heap_trimmer()

    def reserve(self, nbytes: int) -> None:
        """Take ``nbytes`` of the budget; raises ``ResourceExhausted`` when they do not fit.
        Every successful ``reserve`` is paired with one ``release`` of the same size."""
        if self.limit_bytes and self.in_use + nbytes > self.limit_bytes:
            metrics.MEMORY_REFUSALS.inc()
            raise ResourceExhausted(OVER_BUDGET_MESSAGE)
        self.in_use += nbytes
        metrics.INFLIGHT_REQUEST_BYTES.set(self.in_use)

    def release(self, nbytes: int) -> None:
        self.in_use -= nbytes
        metrics.INFLIGHT_REQUEST_BYTES.set(self.in_use)
        self._released_since_trim += nbytes
        if self.in_use == 0 and self._released_since_trim >= TRIM_AFTER_BYTES:
            # Large requests leave freed memory in malloc's arenas (grpc's threads each have one);
            # without this a burst of big calls kept RSS near its peak for good.
            self._released_since_trim = 0
            self._trim()


def heap_trimmer() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (give free heap memory back to the system); a no-op elsewhere."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return lambda: None
    return lambda: trim(0)

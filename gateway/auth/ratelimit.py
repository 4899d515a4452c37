"""Per-tenant token buckets: each tenant may make ``rate_per_s`` calls a second on average and
``burst`` at once; a call that finds its tenant's bucket empty is refused (RESOURCE_EXHAUSTED).

Buckets are created on a tenant's first call and refilled lazily from the injected monotonic
clock, so an idle tenant costs nothing. When more than ``max_tenants`` buckets exist, the full
ones (tenants idle long enough to have refilled) are dropped: they would start full anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_MAX_TENANTS = 100_000


class TenantRateLimiter:
    """Token buckets keyed by tenant."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_tenants: int = DEFAULT_MAX_TENANTS,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self._rate = float(rate_per_s)
        self._burst = float(burst) if burst > 0 else max(self._rate, 1.0)
        self._clock = clock
        self._max_tenants = max_tenants
        self._buckets: dict[str, list[float]] = {}  # tenant -> [tokens, last refill time]

    @property
    def tenants(self) -> int:
        return len(self._buckets)

    def allow(self, tenant: str) -> bool:
        """Take one token from ``tenant``'s bucket; False when it is empty."""
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= self._max_tenants:
                self._drop_full(now)
            self._buckets[tenant] = [self._burst - 1.0, now]
            return True
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def _drop_full(self, now: float) -> None:
        full = [
            tenant
            for tenant, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self._rate >= self._burst
        ]
        for tenant in full:
            del self._buckets[tenant]
        if len(self._buckets) >= self._max_tenants:  # every tenant is busy: forget the oldest
            del self._buckets[next(iter(self._buckets))]

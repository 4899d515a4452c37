"""Variant selection: which variant of a model serves one call.

In order:

1. **Pin.** ``x-infergate-variant`` metadata names the variant; an unknown name is
   INVALID_ARGUMENT. A pin may name a variant whose weight is 0 (that is what pins are for: trying
   a candidate by hand). Only a caller allowed to infer the model gets this far: the servicer
   checks the ``infer:<model>`` scope before anything else, pins included.
2. **Sticky key.** When the model's ``routing.sticky_key`` names a request parameter (else a
   metadata key) that the call carries, the key is hashed with BLAKE2b and the route's salt (the
   model name unless ``routing.salt`` is set) into one of ``BUCKETS`` buckets. Each bucket belongs
   to the variant that wins a weighted rendezvous (highest-random-weight) draw for that bucket:
   variant ``v`` scores ``weight(v) / -ln(u(bucket, v))`` where ``u`` is a stable uniform number
   derived from the salt, the variant's name and the bucket. Every replica computes the same table,
   before and after restarts, and raising one variant's weight only moves buckets *to* that
   variant (lowering it only moves buckets away from it): a weight change moves only the keys it
   must, however many variants the route has.
3. **Weighted random** over the current weights.

Everything here runs on the hot path and touches no network: a call reads the route once from the
in-memory ``RouteTable`` and uses the ``RoutePlan`` prepared for that exact ``Route`` object (built
once per revision, normally ahead of the first call by ``prepare``).
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import itertools
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from infergate.gateway.errors import InvalidArgument
from infergate.router.table import Route, RouteTable

PIN_METADATA = "x-infergate-variant"
PINNED, STICKY, WEIGHTED = "pin", "sticky", "weighted"
"""Why a variant was chosen (the routing span's ``infergate.route.reason``)."""
BUCKETS = 10000
"""Sticky buckets per route: shares are realised to about 0.01 %."""


def stable_hash64(*parts: str | bytes) -> int:
    """A 64-bit hash that is the same in every process and release (unlike ``hash()``)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(4, "little"))
        digest.update(data)
    return int.from_bytes(digest.digest(), "little")


def sticky_bucket(salt: bytes, key: bytes) -> int:
    """The bucket of ``key`` under ``salt`` (the per-call part of sticky routing)."""
    digest = hashlib.blake2b(key, digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "little") % BUCKETS


def salt_bytes(salt: str) -> bytes:
    """BLAKE2b takes a salt of at most 16 bytes: longer salts are hashed down to 16."""
    data = salt.encode("utf-8")
    return data if len(data) <= 16 else hashlib.blake2b(data, digest_size=16).digest()


def _uniform(seed: int, buckets: np.ndarray) -> np.ndarray:
    """splitmix64 of ``seed ^ bucket``, as floats in (0, 1): stable on every platform."""
    with np.errstate(over="ignore"):
        x = (buckets ^ np.uint64(seed)) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def bucket_owners(salt: str, variants: tuple[str, ...], weights: Mapping[str, int]) -> tuple[str, ...]:
    """For every bucket, the variant that wins its weighted rendezvous draw."""
    buckets = np.arange(BUCKETS, dtype=np.uint64)
    scores = np.empty((len(variants), BUCKETS))
    for row, name in enumerate(variants):
        exponential = -np.log(_uniform(stable_hash64(salt, name), buckets))
        scores[row] = weights.get(name, 0) / exponential
    winners = scores.argmax(axis=0)
    return tuple(variants[i] for i in winners)


@dataclass(frozen=True)
class RoutePlan:
    """What selection needs for one ``Route`` object, computed once for it."""

    route: Route
    cumulative: tuple[int, ...]
    """Running sum of the weights in variant order (for weighted random)."""
    total: int
    owners: tuple[str, ...] | None
    """Sticky bucket owners; None for routes without a sticky key."""

    @classmethod
    def build(cls, route: Route, salt: str, sticky: bool) -> RoutePlan:
        weights = [route.weights.get(name, 0) for name in route.variants]
        owners = bucket_owners(salt, route.variants, route.weights) if sticky else None
        return cls(route, tuple(itertools.accumulate(weights)), sum(weights), owners)

    def random_variant(self, rng: random.Random | None = None) -> str:
        point = (rng or random).random() * self.total
        index = bisect.bisect_right(self.cumulative, point)
        return self.route.variants[min(index, len(self.route.variants) - 1)]


class VariantSelector(abc.ABC):
    """Chooses the variant that serves a call; must be cheap and never block."""

    @abc.abstractmethod
    def select(
        self, model: str, variants: Collection[str], metadata: Mapping[str, str], parameters: Mapping[str, Any]
    ) -> tuple[str, str]:
        """``(variant, reason)`` for a call to ``model``, whose variants are ``variants``.

        ``metadata`` is the call's (keys lower-case), ``parameters`` the request's. Raises
        InvalidArgument for a pin naming no variant of the model.
        """


class RouteSelector(VariantSelector):
    """Pin, then sticky key, then weighted random, over the routes of a ``RouteTable``."""

    def __init__(self, routes: RouteTable, rng: random.Random | None = None) -> None:
        self._routes = routes
        self._rng = rng
        self._plans: dict[str, RoutePlan] = {}
        self._sticky: dict[str, tuple[str, bytes]] = {}
        """model -> (sticky key name, salt bytes), for models that route by a sticky key."""
        self._salts: dict[str, str] = {}

    def configure(self, model: str, sticky_key: str, salt: str = "") -> None:
        """Route ``model`` by ``sticky_key`` (empty: no sticky routing) with ``salt`` (default: model name)."""
        self._salts[model] = salt or model
        if sticky_key:
            self._sticky[model] = (sticky_key, salt_bytes(salt or model))
        else:
            self._sticky.pop(model, None)
        self._plans.pop(model, None)

    def prepare(self, route: Route) -> RoutePlan:
        """Build (or reuse) the plan for ``route``; call it when a route is installed."""
        plan = self._plans.get(route.model)
        if plan is None or plan.route is not route:
            salt = self._salts.get(route.model, route.model)
            plan = RoutePlan.build(route, salt, route.model in self._sticky)
            self._plans[route.model] = plan
        return plan

    def select(
        self, model: str, variants: Collection[str], metadata: Mapping[str, str], parameters: Mapping[str, Any]
    ) -> tuple[str, str]:
        pinned = metadata.get(PIN_METADATA)
        if pinned is not None:
            if pinned not in variants:
                raise InvalidArgument(f"{PIN_METADATA}: model {model!r} has no variant {pinned!r}; it has {sorted(variants)}")
            return pinned, PINNED
        route = self._routes.get(model)
        plan = self._plans.get(model)
        if plan is None or plan.route is not route:
            plan = self.prepare(route)
        sticky = self._sticky.get(model)
        if sticky is not None:
            key = _sticky_value(sticky[0], metadata, parameters)
            if key is not None:
                return plan.owners[sticky_bucket(sticky[1], key)], STICKY  # type: ignore[index]
        return plan.random_variant(self._rng), WEIGHTED

    def choose_sticky(self, model: str, key: str | bytes) -> str:
        """The variant ``key`` maps to under the current route (for tools and tests)."""
        sticky = self._sticky.get(model)
        if sticky is None:
            raise InvalidArgument(f"model {model!r} has no sticky key")
        data = key.encode("utf-8") if isinstance(key, str) else key
        plan = self.prepare(self._routes.get(model))
        return plan.owners[sticky_bucket(sticky[1], data)]  # type: ignore[index]


def _sticky_value(name: str, metadata: Mapping[str, str], parameters: Mapping[str, Any]) -> bytes | None:
    """The sticky key's value from the request parameters, else from metadata."""
    value: Any = parameters.get(name)
    if value is None:
        value = metadata.get(name.lower())
        if value is None:
            return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        value = int(value)
    return str(value).encode("utf-8")

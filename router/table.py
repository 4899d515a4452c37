"""Route state: one immutable ``Route`` per model, swapped whole in a ``RouteTable``.

A call reads the route once and works with that snapshot, so it always sees one consistent
revision even while an SRE changes weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from infergate.gateway.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class Route:
    """The weights of one model's variants at one revision."""

    model: str
    variants: tuple[str, ...]
    """Variant names in config order; the first is the baseline."""
    weights: Mapping[str, int]
    revision: int = 0
    updated_at_unix_s: float = 0.0
    updated_by: str = "config"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))

    @property
    def baseline(self) -> str:
        return self.variants[0]

    @property
    def total_weight(self) -> int:
        return sum(self.weights.values())

    def with_weights(self, weights: Mapping[str, int], revision: int, **changes) -> Route:
        """A new route with these weights; unknown variants or all-zero weights are refused."""
        check_weights(self.variants, weights)
        full = {name: int(weights.get(name, 0)) for name in self.variants}
        return Route(self.model, self.variants, full, revision, **changes)


def check_weights(variants: Iterable[str], weights: Mapping[str, int], max_weight: int = 100000) -> None:
    """Raise InvalidArgument unless ``weights`` name only known variants, in range, not all zero."""
    known = set(variants)
    unknown = sorted(set(weights) - known)
    if unknown:
        raise InvalidArgument(f"unknown variant(s) {unknown}; the route has {sorted(known)}")
    bad = {name: w for name, w in weights.items() if not 0 <= int(w) <= max_weight}
    if bad:
        raise InvalidArgument(f"weights must be between 0 and {max_weight}: {bad}")
    if sum(int(w) for w in weights.values()) <= 0:
        raise InvalidArgument("weights must not all be zero")


@dataclass
class RouteTable:
    """The current route of every model; readers take a snapshot, writers swap whole routes."""

    _routes: dict[str, Route] = field(default_factory=dict)

    def get(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is None:
            raise NotFound(f"unknown model {model!r}")
        return route

    def __contains__(self, model: str) -> bool:
        return model in self._routes

    def models(self) -> list[str]:
        return list(self._routes)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def install(self, route: Route, force: bool = False) -> bool:
        """Replace a model's route if ``route`` is newer (or the first, or ``force``); True when it changed.

        ``force`` is for the route store's resync, where Redis is the truth even when its revision
        went back (state restored from an older snapshot).
        """
        current = self._routes.get(route.model)
        if not force and current is not None and route.revision <= current.revision and current.revision != 0:
            return False
        self._routes[route.model] = route
        return True

"""The audit log of route changes: one Redis stream per model.

Entries are appended by the route store's change script in the same atomic step as the change
itself (so there is no change without its entry, and no entry without its change); this module
names the streams, decodes entries and reads them back, newest first.

Stream ``infergate:audit:<model>``, capped at about ``MAX_ENTRIES`` entries, fields:
``model, time (unix s), subject, action, old (JSON weights), new (JSON weights), reason, revision``.
``subject`` is the caller's token subject, ``config`` for changes a deployed config forced, and
``canary-controller`` for the automated canary analysis.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

AUDIT_STREAM_PREFIX = "infergate:audit:"
MAX_ENTRIES = 10000
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


def audit_key(model: str) -> str:
    return AUDIT_STREAM_PREFIX + model


@dataclass(frozen=True)
class AuditRecord:
    """One recorded route change."""

    id: str
    """Stream entry id (``<ms>-<seq>``), unique and ordered."""
    model: str
    time_unix_s: float
    subject: str
    action: str
    """``init``, ``config``, ``restore``, ``set_weights``, ``promote``, ``rollback`` or ``canary_*``."""
    old_weights: Mapping[str, int]
    new_weights: Mapping[str, int]
    reason: str
    revision: int

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[str, str]) -> AuditRecord:
        return cls(
            id=entry_id,
            model=fields.get("model", ""),
            time_unix_s=float(fields.get("time", 0) or 0),
            subject=fields.get("subject", ""),
            action=fields.get("action", ""),
            old_weights=_weights(fields.get("old")),
            new_weights=_weights(fields.get("new")),
            reason=fields.get("reason", ""),
            revision=int(fields.get("revision", 0) or 0),
        )


def _weights(text: str | None) -> dict[str, int]:
    if not text:
        return {}
    return {str(name): int(weight) for name, weight in json.loads(text).items()}


class AuditLog:
    """Reads the audit streams; ``client`` must decode responses to ``str``."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def entries(self, models: Iterable[str], limit: int = DEFAULT_LIMIT) -> list[AuditRecord]:
        """The newest ``limit`` entries of ``models``, newest first (raises Redis errors as they come)."""
        limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
        per_model = []
        for model in models:
            rows = await self._client.xrevrange(audit_key(model), count=limit)
            per_model.append([AuditRecord.from_fields(entry_id, fields) for entry_id, fields in rows])
        merged = heapq.merge(*per_model, key=_order_key, reverse=True)
        return list(merged)[:limit]


def _order_key(record: AuditRecord) -> tuple[int, float, int]:
    """Redis's own clock first (one clock for every stream), the writer's time to break ties."""
    millis, _, seq = record.id.partition("-")
    return int(millis), record.time_unix_s, int(seq or 0)

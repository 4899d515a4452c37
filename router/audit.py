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
MAX_FIELD_CHARS = 2048
"""The longest field an audit read returns (a reason is at most 1024 characters since writes are bounded)."""

# XREVRANGE with every field value cut to at most ARGV[2] bytes (on a character boundary) inside Redis, so no reply can be too big.
_LUA_READ = """
local rows = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', tonumber(ARGV[1]))
local cap = tonumber(ARGV[2])
for _, row in ipairs(rows) do
  local fields = row[2]
  for i = 2, #fields, 2 do
    local value = fields[i]
    if #value > cap then
      local cut = cap
      while cut > 0 and string.byte(value, cut + 1) >= 128 and string.byte(value, cut + 1) < 192 do
        cut = cut - 1  -- never split a UTF-8 character: the reply is decoded as text
      end
      fields[i] = string.sub(value, 1, cut)
    end
  end
end
return rows
"""


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
            time_unix_s=_number(fields.get("time"), float),
            subject=fields.get("subject", ""),
            action=fields.get("action", ""),
            old_weights=_weights(fields.get("old")),
            new_weights=_weights(fields.get("new")),
            reason=fields.get("reason", ""),
            revision=_number(fields.get("revision"), int),
        )


def _weights(text: str | None) -> dict[str, int]:
    """Weights from their JSON text; ``{}`` for anything else (an entry must never make the log unreadable)."""
    try:
        parsed = json.loads(text) if text else {}
        return {str(name): int(weight) for name, weight in parsed.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _number(text: str | None, kind: type) -> float | int:
    try:
        return kind(text or 0)
    except (ValueError, TypeError):
        return kind(0)


class AuditLog:
    """Reads the audit streams; ``client`` must decode responses to ``str``."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def entries(self, models: Iterable[str], limit: int = DEFAULT_LIMIT) -> list[AuditRecord]:
        """The newest ``limit`` entries of ``models``, newest first (raises Redis errors as they come).

        Always readable, whatever was stored: Redis cuts every field to ``MAX_FIELD_CHARS`` before
        it replies (an entry written before inputs were bounded may hold megabytes), and a field
        that does not decode reads as empty.
        """
        limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
        read = self._client.register_script(_LUA_READ)
        per_model = []
        for model in models:
            rows = await read(keys=[audit_key(model)], args=[limit, MAX_FIELD_CHARS])
            per_model.append([AuditRecord.from_fields(entry_id, dict(zip(flat[::2], flat[1::2]))) for entry_id, flat in rows])
        merged = heapq.merge(*per_model, key=_order_key, reverse=True)
        return list(merged)[:limit]


def _order_key(record: AuditRecord) -> tuple[int, float, int]:
    """Redis's own clock first (one clock for every stream), the writer's time to break ties."""
    millis, _, seq = record.id.partition("-")
    return int(millis), record.time_unix_s, int(seq or 0)

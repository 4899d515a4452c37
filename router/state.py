"""Shared route state in Redis, mirrored into each replica's in-memory ``RouteTable``.

Redis is the running system's truth; config-file weights are only the initial state.

Layout (all keys under ``infergate:``):

- ``infergate:route:<model>`` hash: ``revision``, ``variants`` (JSON list, config order),
  ``variant_set`` (sorted JSON list), ``weights`` (JSON object), ``updated_at``, ``updated_by``.
- ``infergate:audit:<model>`` stream: one entry per change (see ``router.audit``).
- channel ``infergate:routes``: one JSON message per change.

Every write is one Lua script that checks, writes the hash, appends the audit entry and publishes,
atomically: a change is applied whole or not at all, and always with its audit entry.
``change`` is a compare-and-set on ``expected_revision`` (stale: ``Aborted``).

Each replica runs one sync task: it subscribes to the channel, then (re)loads every model's state
(``reconcile``), then applies published changes as they come (well within a second), and
reconciles again every ``resync_interval_s`` as a safety net for lost messages. ``reconcile``
also seeds Redis: an absent route is written from the config (revision 1, subject ``config``), or,
when Redis lost its data while this replica kept serving, restored from the replica's last known
route at that revision. On the first sync after start, a route whose variant set differs from
this replica's config is replaced by the config's weights as a new revision (subject ``config``):
the deployed config wins. Later resyncs never overwrite: a replica running an older config during
a rollout keeps its last routes and logs a warning instead of fighting the new one.

While Redis is unreachable the replica keeps serving its last known routes; admin calls raise
``Unavailable``; the sync task retries and resynchronises when Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infergate.gateway import metrics
from infergate.gateway.config import ModelRouteConfig
from infergate.gateway.errors import Aborted, FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable
from infergate.gateway.redaction import redact_url
from infergate.router.audit import MAX_ENTRIES, AuditLog, AuditRecord, audit_key
from infergate.router.table import Route, RouteTable, check_weights

log = logging.getLogger(__name__)

ROUTE_KEY_PREFIX = "infergate:route:"
CHANGES_CHANNEL = "infergate:routes"
CONFIG_SUBJECT = "config"
CHANGE_KEY_PREFIX = "infergate:change:"
CHANGE_KEY_TTL_S = 24 * 3600
"""How long a change's idempotency key is remembered: retries come within seconds, a day is ample."""
MAX_REASON_CHARS = 1024
MAX_REQUEST_ID_CHARS = 128

RouteListener = Callable[[Route, "AuditRecord | None"], None]
"""Called after a route is installed, with the change record when one is known."""

# KEYS: route hash, audit stream. ARGV: see _write_and_publish's callers.
_LUA_WRITE = """
local function write(rev, variant_set, variants, weights, now, subject, action, reason, model, channel, maxlen, old)
  redis.call('HSET', KEYS[1], 'revision', rev, 'variant_set', variant_set, 'variants', variants,
             'weights', weights, 'updated_at', now, 'updated_by', subject)
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'model', model, 'time', now,
                        'subject', subject, 'action', action, 'old', old, 'new', weights,
                        'reason', reason, 'revision', rev)
  redis.call('PUBLISH', channel, cjson.encode({model=model, revision=rev, variants=variants,
             weights=weights, updated_at=now, updated_by=subject, id=id, action=action,
             old=old, reason=reason}))
  return id
end
"""

_LUA_CHANGE = _LUA_WRITE + """
-- KEYS[3]: this change's idempotency key. ARGV: expected_revision (0: no check), floor_revision,
--       variant_set, variants, weights, now, subject, action, reason, model, channel, maxlen, key_ttl_s
local done = redis.call('GET', KEYS[3])
if done then  -- a retry of a change already made (by a client, or by the Redis client's own retry)
  local first = cjson.decode(done)
  return {'replay', first[1], first[2]}
end
local stored_set = redis.call('HGET', KEYS[1], 'variant_set')
local rev = tonumber(redis.call('HGET', KEYS[1], 'revision') or ARGV[2])
if stored_set and stored_set ~= ARGV[3] then
  return {'conflict', tostring(rev), stored_set}
end
local expected = tonumber(ARGV[1])
if expected > 0 and expected ~= rev then
  return {'stale', tostring(rev), ''}
end
local old = redis.call('HGET', KEYS[1], 'weights') or '{}'
local id = write(rev + 1, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10],
                 ARGV[11], ARGV[12], old)
redis.call('SET', KEYS[3], cjson.encode({tostring(rev + 1), id}), 'EX', tonumber(ARGV[13]))
return {'ok', tostring(rev + 1), id}
"""

_LUA_RECONCILE = _LUA_WRITE + """
-- ARGV: variant_set, variants, config_weights, local_revision, local_weights, now, replica,
--       model, channel, maxlen, config_wins (1/0)
local stored_set = redis.call('HGET', KEYS[1], 'variant_set')
if not stored_set then
  local local_rev = tonumber(ARGV[4])
  if local_rev > 0 then
    write(local_rev, ARGV[1], ARGV[2], ARGV[5], ARGV[6], ARGV[7], 'restore',
          'route state missing in Redis; restored from the route this replica served', ARGV[8],
          ARGV[9], ARGV[10], '{}')
  else
    write(1, ARGV[1], ARGV[2], ARGV[3], ARGV[6], 'config', 'init', 'initial weights from the config',
          ARGV[8], ARGV[9], ARGV[10], '{}')
  end
elseif stored_set ~= ARGV[1] and ARGV[11] == '1' then
  local rev = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
  local old = redis.call('HGET', KEYS[1], 'weights') or '{}'
  write(rev + 1, ARGV[1], ARGV[2], ARGV[3], ARGV[6], 'config', 'config',
        'the deployed config changed the variants from ' .. stored_set .. ' to ' .. ARGV[1],
        ARGV[8], ARGV[9], ARGV[10], old)
end
return redis.call('HGETALL', KEYS[1])
"""


def route_key(model: str) -> str:
    return ROUTE_KEY_PREFIX + model


def change_key(model: str, request_id: str) -> str:
    """Where the result of the change with idempotency key ``request_id`` is kept (``CHANGE_KEY_TTL_S``)."""
    return f"{CHANGE_KEY_PREFIX}{model}:{request_id}"


def check_change_inputs(reason: str, request_id: str) -> None:
    """Admin inputs are bounded: what goes into Redis, the audit log and every replica's pubsub."""
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidArgument(f"reason is {len(reason)} characters; at most {MAX_REASON_CHARS}")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")


def default_replica_id() -> str:
    """``host:pid:random``: unique per process, readable in lease values and audit entries."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def connect(url: str, socket_timeout_s: float) -> Redis:
    """A redis.asyncio client for off-hot-path work: short timeouts, one quick retry, str replies."""
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(ConstantBackoff(0.05), 1),
    )


def raise_if_cancel_requested() -> None:
    """Raise ``CancelledError`` when the current task has been asked to cancel yet runs on.

    A background loop that calls Redis calls this once a round, so that cancelling it always ends
    it. The request can be lost on the way: on Python 3.11, ``asyncio.wait_for``, through which
    redis-py writes every command, returns the write's result instead of raising when the cancel
    comes after the write finished but before the caller resumed. The task then runs on, ``stop``
    waits on it for ever, and only ``Task.cancelling()``, left above zero, still shows the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate Redis failures at this edge: unreachable -> Unavailable, anything else -> Internal."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise Unavailable(f"{what}: route store (Redis) unreachable") from exc
    except RedisError as exc:
        raise Internal(f"{what}: route store (Redis) error") from exc


class RouteStore:
    """Reads and changes routes in Redis and keeps ``routes`` in step with it."""

    def __init__(
        self,
        url: str,
        models: Mapping[str, ModelRouteConfig],
        routes: RouteTable,
        socket_timeout_s: float = 0.5,
        replica_id: str = "",
        resync_interval_s: float = 5.0,
        retry_interval_s: float = 0.5,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._models = dict(models)
        self._routes = routes
        self._socket_timeout_s = socket_timeout_s
        self.replica_id = replica_id or default_replica_id()
        self._resync_interval_s = resync_interval_s
        self._retry_interval_s = retry_interval_s
        self._wall_clock = wall_clock
        self._listeners: list[RouteListener] = []
        self._client: Redis | None = None
        self._task: asyncio.Task | None = None
        self._synced: asyncio.Event | None = None
        self._connected = False
        self._unreachable_since: float | None = None
        self._config_applied = False
        self._ignored: set[tuple[str, str]] = set()
        self._scripts: dict[str, Any] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, first_sync_timeout_s: float = 3.0) -> bool:
        """Start syncing; wait up to ``first_sync_timeout_s`` for the first load. True when loaded.

        When Redis cannot be reached in time the replica starts on the config's weights and
        keeps trying in the background.
        """
        self._client = connect(self._url, self._socket_timeout_s)
        self._unreachable_since = self._wall_clock()  # until the first sync succeeds
        self._synced = asyncio.Event()
        self._task = asyncio.create_task(self._sync_forever(), name="infergate-route-sync")
        try:
            async with asyncio.timeout(first_sync_timeout_s):  # not wait_for: see raise_if_cancel_requested
                await self._synced.wait()
        except TimeoutError:
            log.warning(
                "route store at %s not reachable at start; serving the config's weights until it is", redact_url(self._url)
            )
            return False
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            self._scripts.clear()
        self._connected = False

    @property
    def client(self) -> Redis:
        """The shared client (for the audit log and the canary controller)."""
        if self._client is None:
            raise FailedPrecondition("the route store is not started")
        return self._client

    @property
    def connected(self) -> bool:
        """Whether the sync task currently holds a live subscription."""
        return self._connected

    @property
    def unreachable_since(self) -> float | None:
        """Wall-clock time since which Redis has been unreachable (None while connected)."""
        return None if self._connected else self._unreachable_since

    def add_listener(self, listener: RouteListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: RouteListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    # -- changes -------------------------------------------------------------------------------

    async def set_weights(
        self,
        model: str,
        weights: Mapping[str, int],
        subject: str,
        reason: str = "",
        expected_revision: int = 0,
        action: str = "set_weights",
        request_id: str = "",
    ) -> Route:
        """Replace ``model``'s weights (missing variants get 0); the new route, installed here too.

        Exactly once per ``request_id``: a second call with the same key changes nothing and returns
        the route as it is. Without one, the call gets its own key, so the Redis client's retry of
        a script whose reply was lost does not change the route twice.

        Raises NotFound (model), InvalidArgument (unknown variant, out of range, all zero, inputs
        over their bounds), Aborted (``expected_revision`` is set and stale), Unavailable (Redis down).
        """
        current = self.local_route(model)
        check_change_inputs(reason, request_id)
        check_weights(current.variants, weights)
        full = {name: int(weights.get(name, 0)) for name in current.variants}
        self.require_connected("change routes")
        variants = current.variants
        args = [
            int(expected_revision), current.revision, _variant_set(variants), json.dumps(list(variants)),
            json.dumps(full), repr(self._wall_clock()), subject, action, reason, model, CHANGES_CHANNEL, MAX_ENTRIES,
            CHANGE_KEY_TTL_S,
        ]
        keys = [route_key(model), audit_key(model), change_key(model, request_id or uuid.uuid4().hex)]
        with redis_errors(f"change route of {model!r}"):
            status, revision, detail = await self._script(_LUA_CHANGE)(keys=keys, args=args)
        if status == "replay":
            log.info("route change %s of %s was already made (revision %s); not made again", request_id, model, revision)
            return self.local_route(model)
        if status == "stale":
            raise Aborted(f"route of {model!r} is at revision {revision}, not {expected_revision}; re-read and retry")
        if status == "conflict":
            raise FailedPrecondition(
                f"route of {model!r} in Redis has variants {detail}, this replica's config has {list(variants)}"
            )
        route = Route(model, variants, full, int(revision), updated_at_unix_s=float(args[5]), updated_by=subject)
        record = AuditRecord(detail, model, route.updated_at_unix_s, subject, action, dict(current.weights), full, reason, route.revision)
        self._install(route, record)
        return route

    async def promote(self, model: str, variant: str, subject: str, reason: str = "", action: str = "promote",
                      expected_revision: int = 0, request_id: str = "") -> Route:
        """``variant`` to 100, every other variant to 0."""
        current = self.local_route(model)
        if variant not in current.variants:
            raise InvalidArgument(f"model {model!r} has no variant {variant!r}; it has {list(current.variants)}")
        return await self.set_weights(model, {variant: 100}, subject, reason, expected_revision, action, request_id)

    async def rollback(self, model: str, subject: str, reason: str = "", action: str = "rollback",
                       expected_revision: int = 0, request_id: str = "") -> Route:
        """Back to the baseline (the first variant in config) at 100."""
        return await self.promote(model, self.local_route(model).baseline, subject, reason, action, expected_revision,
                                  request_id)

    # -- reads ---------------------------------------------------------------------------------

    def local_route(self, model: str) -> Route:
        """The route this replica serves now (NotFound for an unknown model)."""
        if model not in self._models:
            raise NotFound(f"unknown model {model!r}")
        return self._routes.get(model)

    async def read_route(self, model: str) -> Route:
        """The route as Redis holds it now (for the canary leader, which must not act on a stale copy)."""
        self.local_route(model)
        with redis_errors(f"read route of {model!r}"):
            fields = await self.client.hgetall(route_key(model))
        if not fields:
            raise Unavailable(f"route of {model!r} is not in Redis yet")
        return self._route_from(model, fields)

    async def audit_log(self, model: str = "", limit: int = 0) -> list[AuditRecord]:
        """Newest first; ``model`` empty means every model this replica serves."""
        models = [model] if model else list(self._models)
        if model:
            self.local_route(model)
        self.require_connected("read the audit log")
        with redis_errors("read the audit log"):
            return await AuditLog(self.client).entries(models, limit)

    # -- sync ----------------------------------------------------------------------------------

    async def _sync_forever(self) -> None:
        outage_logged = False
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANGES_CHANNEL)
                await self._reconcile()
                if outage_logged:
                    log.warning("route store reachable again; routes resynchronised")
                outage_logged = False
                self._connected = True
                self._unreachable_since = None
                metrics.REDIS_UP.labels("route_store").set(1)
                assert self._synced is not None
                self._synced.set()
                await self._follow(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                metrics.REDIS_UP.labels("route_store").set(0)
                if not outage_logged:
                    log.warning("route store unreachable (%s); serving the last known routes", exc.__class__.__name__)
                    outage_logged = True
            except Exception:
                log.exception("route sync failed; retrying")
            finally:
                self._connected = False
                if self._unreachable_since is None:
                    self._unreachable_since = self._wall_clock()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            raise_if_cancel_requested()
            await asyncio.sleep(self._retry_interval_s)

    async def _follow(self, pubsub) -> None:
        """Apply published changes; reconcile every ``resync_interval_s``. Returns only by raising."""
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self._resync_interval_s
        while True:
            raise_if_cancel_requested()  # lost in the subscribe or a reconcile
            timeout = max(0.0, min(1.0, next_resync - loop.time()))
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is not None and message.get("type") == "message":
                self._on_message(message["data"])
            if loop.time() >= next_resync:
                await self._reconcile()
                next_resync = loop.time() + self._resync_interval_s

    async def _reconcile(self) -> None:
        """Load (and where needed seed) every model's route from Redis and install it."""
        config_wins = not self._config_applied
        script = self._script(_LUA_RECONCILE)
        for model, config in self._models.items():
            local = self._routes.get(model) if model in self._routes else None
            variants = tuple(config.variants)
            config_weights = {name: v.weight for name, v in config.variants.items()}
            args = [
                _variant_set(variants), json.dumps(list(variants)), json.dumps(config_weights),
                local.revision if local is not None else 0,
                json.dumps(dict(local.weights) if local is not None else config_weights),
                repr(self._wall_clock()), f"replica {self.replica_id}", model, CHANGES_CHANNEL, MAX_ENTRIES,
                "1" if config_wins else "0",
            ]
            flat = await script(keys=[route_key(model), audit_key(model)], args=args)
            fields = dict(zip(flat[::2], flat[1::2]))
            self._apply(model, fields, None, force=True)
        self._config_applied = True

    def _on_message(self, data: str) -> None:
        try:
            message = json.loads(data)
            model = message["model"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed route change message")
            return
        if model not in self._models:
            return
        record = AuditRecord.from_fields(
            message.get("id", ""),
            {
                "model": model, "time": message.get("updated_at", 0), "subject": message.get("updated_by", ""),
                "action": message.get("action", ""), "old": message.get("old", ""), "new": message.get("weights", ""),
                "reason": message.get("reason", ""), "revision": message.get("revision", 0),
            },
        )
        fields = {
            "revision": message.get("revision", 0), "variants": message.get("variants", "[]"),
            "weights": message.get("weights", "{}"), "updated_at": message.get("updated_at", 0),
            "updated_by": message.get("updated_by", ""),
        }
        self._apply(model, fields, record, force=False)

    def _apply(self, model: str, fields: Mapping[str, Any], record: AuditRecord | None, force: bool) -> None:
        try:
            route = self._route_from(model, fields)
        except _ForeignRoute as exc:
            key = (model, str(exc))
            if key not in self._ignored:
                self._ignored.add(key)
                log.warning("route of %s in Redis does not match this replica's config (%s); keeping the last route", model, exc)
            return
        self._install(route, record, force)

    def _install(self, route: Route, record: AuditRecord | None, force: bool = False) -> None:
        current = self._routes.get(route.model) if route.model in self._routes else None
        if force and current is not None and current.revision != route.revision:
            current = None  # Redis is the truth, even when it went back in time (restored snapshot)
        if current is not None and route.revision <= current.revision and current.revision != 0:
            return
        if current is not None and current.revision == route.revision and dict(current.weights) == dict(route.weights):
            return
        self._routes.install(route, force=True)
        for listener in list(self._listeners):
            try:
                listener(route, record)
            except Exception:
                log.exception("route listener failed")

    def _route_from(self, model: str, fields: Mapping[str, Any]) -> Route:
        """A ``Route`` in this replica's config order; raises _ForeignRoute when the variants differ."""
        config = self._models[model]
        variants = tuple(config.variants)
        stored = json.loads(fields.get("variants") or "[]")
        if sorted(stored) != sorted(variants):
            raise _ForeignRoute(f"Redis has {stored}, the config has {list(variants)}")
        weights = {str(k): int(v) for k, v in json.loads(fields.get("weights") or "{}").items()}
        return Route(
            model,
            variants,
            {name: weights.get(name, 0) for name in variants},
            int(fields.get("revision") or 0),
            updated_at_unix_s=float(fields.get("updated_at") or 0),
            updated_by=str(fields.get("updated_by") or ""),
        )

    # -- helpers -------------------------------------------------------------------------------

    def require_connected(self, what: str) -> None:
        """Raise Unavailable while the sync task has no live connection (admin calls fail fast)."""
        if not self._connected:
            raise Unavailable(f"cannot {what}: route store (Redis) unreachable; serving the last known routes")

    def _script(self, source: str):
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script


class _ForeignRoute(Exception):
    """A stored route whose variants are not this replica's."""


def _variant_set(variants: tuple[str, ...]) -> str:
    return json.dumps(sorted(variants))

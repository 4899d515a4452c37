"""Automated canary analysis: step a candidate variant up while it is healthy, roll it back when not.

Configured by a model's ``canary`` block. One replica drives each model's canary: the holder of a
lease in Redis (``SET NX PX``, renewed every tick by a compare-and-renew script; a replica that dies
stops renewing and another takes over within ``lease_ttl_s``; a replica that shuts down cleanly
releases it at once).

**Observations are per replica; the verdict is global.** Every replica records, for each call of
the model, the chosen variant, whether it failed on the server side (INTERNAL, UNAVAILABLE,
DEADLINE_EXCEEDED, UNKNOWN, ...; caller mistakes such as INVALID_ARGUMENT do not count) and, for
successful calls, its latency in a fixed log-spaced histogram. Calls are grouped in wall-clock
windows of ``interval_s`` (window ``floor(unix_time / interval_s)``, the same on every replica) and
each replica adds its counts into one Redis hash per window
(``infergate:canary:<model>:w:<window>``: ``<variant>:n``, ``<variant>:err``, ``<variant>:b<i>``)
every tick with HINCRBY. The leader judges a window once it has closed and every replica has had a
tick to flush it, from the sums: request counts, error rates and p99 (from the merged histogram,
each bucket's upper bound, so about 10 % resolution) are therefore those of the whole fleet.

**The run.** The run starts (candidate at ``steps_percent[0]``, the baseline at the rest, other
variants at 0) when the leader finds no run for this canary block; any change to the block is a new
run. Each closed window that lies wholly inside the current step is judged:

- fewer than ``min_requests`` candidate calls: not judged, the step waits;
- candidate error rate above the baseline's + ``max_error_rate_increase``, or candidate p99 above
  ``max_p99_latency_ratio`` x the baseline's p99: rolled back (candidate 0, baseline 100), state
  ``rolled_back``, with the reason;
- when feedback labels arrive (the ``infergate.feedback.v1`` RPC, gateway/monitor.py) and both
  variants have at least ``min_labels`` of them in the window: candidate accuracy below the
  baseline's - ``max_accuracy_decrease``: rolled back. Labels count in the window they arrive in
  (they come later than the calls they label); without labels this check is skipped;
- otherwise healthy: the next step; after the last step the candidate is promoted to 100.

Every weight change goes through the route store with the subject ``canary-controller`` and is
audited like an SRE's. A route change the controller did not make (an SRE's ``canary set``,
``promote`` or ``rollback``) ends the run: ``promoted`` when the candidate now has all the traffic,
``rolled_back`` when it has none, ``idle`` otherwise; the reason names who changed it.

Run state lives in Redis (``infergate:canary:<model>``) so that a new leader carries on where the
old one stopped; ``CanaryController.status`` reads it for the admin API. Every replica also keeps
the last run state it read: when Redis loses its data (restarted empty, flushed, failed over to an
empty replica) the leader writes that copy back instead of starting the run again, so a promoted or
rolled-back canary stays finished and the route the replicas serve (restored by the route store
from its own copy) is not stepped back to the first step.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace

from redis.exceptions import RedisError

from infergate.gateway import metrics
from infergate.gateway.config import CanaryConfig
from infergate.gateway.errors import Aborted, GatewayError
from infergate.router.state import RouteStore, raise_if_cancel_requested, redis_errors
from infergate.router.table import Route

log = logging.getLogger(__name__)

SUBJECT = "canary-controller"
KEY_PREFIX = "infergate:canary:"
SERVER_FAULT_CODES = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})
"""Codes that count against a variant; the rest are the caller's doing."""

LATENCY_BOUNDS_S: tuple[float, ...] = tuple(50e-6 * 1.1**i for i in range(160))
"""Upper bounds of the latency histogram: 50 us to about 200 s, 10 % apart."""

IDLE, PROGRESSING, PROMOTED, ROLLED_BACK = "idle", "progressing", "promoted", "rolled_back"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def state_key(model: str) -> str:
    return f"{KEY_PREFIX}{model}"


def lease_key(model: str) -> str:
    return f"{KEY_PREFIX}{model}:lease"


def window_key(model: str, window: int) -> str:
    return f"{KEY_PREFIX}{model}:w:{window}"


@dataclass(frozen=True)
class VariantStats:
    """One variant's calls in one window, over the whole fleet."""

    requests: int = 0
    errors: int = 0
    p99_s: float | None = None
    """None when no call succeeded."""
    labelled: int = 0
    """Feedback labels joined to this variant's predictions in the window."""
    correct: int = 0
    """Of those, the ones equal to the prediction."""

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def describe(self) -> str:
        """``"240 calls, 3 errors (0.013), p99 12.1 ms, accuracy 0.910 (91/100 labels)"``: the numbers judged."""
        p99 = f"{self.p99_s * 1000:.1f} ms" if self.p99_s else "n/a"
        text = f"{self.requests} calls, {self.errors} errors ({self.error_rate:.3f}), p99 {p99}"
        if self.labelled:
            text += f", accuracy {self.accuracy:.3f} ({self.correct}/{self.labelled} labels)"
        return text

    @classmethod
    def from_fields(cls, variant: str, fields: Mapping[str, str]) -> VariantStats:
        counts: dict[int, int] = {}
        prefix = f"{variant}:b"
        for name, value in fields.items():
            if name.startswith(prefix):
                counts[int(name[len(prefix):])] = int(value)
        return cls(
            int(fields.get(f"{variant}:n", 0)),
            int(fields.get(f"{variant}:err", 0)),
            percentile(counts, 0.99),
            int(fields.get(f"{variant}:lab", 0)),
            int(fields.get(f"{variant}:ok", 0)),
        )


def percentile(bucket_counts: Mapping[int, int], q: float) -> float | None:
    """The upper bound of the histogram bucket holding the ``q`` quantile."""
    total = sum(bucket_counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(bucket_counts):
        seen += bucket_counts[index]
        if seen >= rank:
            return LATENCY_BOUNDS_S[min(index, len(LATENCY_BOUNDS_S) - 1)]
    return LATENCY_BOUNDS_S[-1]


@dataclass(frozen=True)
class Verdict:
    healthy: bool | None
    """None: not enough data to judge."""
    reason: str


def judge(config: CanaryConfig, baseline: VariantStats, candidate: VariantStats) -> Verdict:
    """The verdict on one window (a pure function of the two variants' numbers).

    The reason names the rule that decided and ends with both variants' numbers, candidate beside
    baseline (``[candidate ... | baseline ...]``), whatever the verdict.
    """
    verdict = _judge(config, baseline, candidate)
    return replace(verdict, reason=f"{verdict.reason} [candidate {candidate.describe()} | baseline {baseline.describe()}]")


def _judge(config: CanaryConfig, baseline: VariantStats, candidate: VariantStats) -> Verdict:
    if candidate.requests < max(config.min_requests, 1):
        return Verdict(None, f"waiting for data: {candidate.requests} of {config.min_requests} candidate calls")
    limit = baseline.error_rate + config.max_error_rate_increase
    if candidate.error_rate > limit:
        return Verdict(
            False,
            f"candidate error rate {candidate.error_rate:.3f} ({candidate.errors}/{candidate.requests}) above "
            f"baseline {baseline.error_rate:.3f} + {config.max_error_rate_increase:g}",
        )
    if baseline.p99_s and candidate.p99_s and candidate.p99_s > config.max_p99_latency_ratio * baseline.p99_s:
        return Verdict(
            False,
            f"candidate p99 {candidate.p99_s * 1000:.1f} ms above {config.max_p99_latency_ratio:g} x baseline p99 "
            f"{baseline.p99_s * 1000:.1f} ms",
        )
    labelled = min(baseline.labelled, candidate.labelled) >= max(config.min_labels, 1)
    if labelled and candidate.accuracy < baseline.accuracy - config.max_accuracy_decrease:
        return Verdict(
            False,
            f"candidate accuracy {candidate.accuracy:.3f} ({candidate.correct}/{candidate.labelled} labels) below "
            f"baseline {baseline.accuracy:.3f} - {config.max_accuracy_decrease:g}",
        )
    return Verdict(True, "candidate healthy")


@dataclass(frozen=True)
class CanaryState:
    """A run's progress, as stored in Redis."""

    fingerprint: str
    candidate: str
    state: str = IDLE
    step_index: int = 0
    current_percent: int = 0
    last_reason: str = ""
    judged_window: int = 0
    """The last window judged (or the window the current step began in)."""
    revision: int = 0
    """The route revision the controller last wrote; another revision means someone else changed it."""
    stats_window: int = -1
    """The window whose numbers ``baseline_stats`` and ``candidate_stats`` are (-1: none judged yet)."""
    baseline_stats: VariantStats | None = None
    candidate_stats: VariantStats | None = None
    verdict: str = ""
    """That window's verdict: ``healthy``, ``unhealthy`` or ``waiting``."""

    @property
    def step(self) -> int:
        """The current step counted from 1, as every text and the admin API say it."""
        return self.step_index + 1

    def to_fields(self) -> dict[str, str]:
        fields = {name: str(getattr(self, name)) for name in _SCALAR_FIELDS}
        for name in ("baseline_stats", "candidate_stats"):
            stats = getattr(self, name)
            fields[name] = json.dumps(asdict(stats)) if stats is not None else ""
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> CanaryState:
        return cls(
            fingerprint=fields.get("fingerprint", ""),
            candidate=fields.get("candidate", ""),
            state=fields.get("state", IDLE),
            step_index=int(fields.get("step_index", 0)),
            current_percent=int(fields.get("current_percent", 0)),
            last_reason=fields.get("last_reason", ""),
            judged_window=int(fields.get("judged_window", 0)),
            revision=int(fields.get("revision", 0)),
            stats_window=int(fields.get("stats_window", -1)),
            baseline_stats=_stats_from_json(fields.get("baseline_stats", "")),
            candidate_stats=_stats_from_json(fields.get("candidate_stats", "")),
            verdict=fields.get("verdict", ""),
        )


_SCALAR_FIELDS = (
    "fingerprint", "candidate", "state", "step_index", "current_percent", "last_reason", "judged_window", "revision",
    "stats_window", "verdict",
)


def _stats_from_json(text: str) -> VariantStats | None:
    return VariantStats(**json.loads(text)) if text else None


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    labelled: int = 0
    correct: int = 0


class CanaryController:
    """Records this replica's observations and, while it holds the lease, drives the model's canary."""

    def __init__(
        self,
        model: str,
        baseline: str,
        config: CanaryConfig,
        store: RouteStore,
        wall_clock: Callable[[], float] = time.time,
        tick_s: float | None = None,
    ) -> None:
        self.model = model
        self.baseline = baseline
        self.config = config
        self._store = store
        self._wall_clock = wall_clock
        self.tick_s = tick_s or min(config.interval_s / 4, config.lease_ttl_s / 3, 1.0)
        self.fingerprint = hashlib.blake2b(config.model_dump_json().encode(), digest_size=8).hexdigest()
        self._watched = (baseline, config.candidate)
        self._pending: dict[tuple[int, str], _Tally] = {}
        self._leader = False
        self._task: asyncio.Task | None = None
        self._outage_logged = False
        self._scripts: dict[str, tuple[object, object]] = {}
        self._known: CanaryState | None = None
        """The last run state read from or written to Redis: restored from here if Redis loses it."""

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def last_known(self) -> CanaryState | None:
        """The run state this replica last read or wrote (what it reports while Redis is unreachable)."""
        return self._known

    # -- hot path ------------------------------------------------------------------------------

    def observe(self, variant: str, code: str, duration_s: float) -> None:
        """Count one call of ``variant`` (cheap: a dict update; flushed to Redis by ``tick``)."""
        if variant not in self._watched:
            return
        key = (int(self._wall_clock() // self.config.interval_s), variant)
        tally = self._pending.get(key)
        if tally is None:
            tally = self._pending[key] = _Tally()
        tally.requests += 1
        if code in SERVER_FAULT_CODES:
            tally.errors += 1
        else:
            bucket = bisect.bisect_left(LATENCY_BOUNDS_S, duration_s)
            tally.latency[bucket] = tally.latency.get(bucket, 0) + 1

    def observe_label(self, variant: str, correct: bool) -> None:
        """Count one feedback label joined to a prediction of ``variant`` (in the window it arrives in)."""
        if variant not in self._watched:
            return
        key = (int(self._wall_clock() // self.config.interval_s), variant)
        tally = self._pending.get(key)
        if tally is None:
            tally = self._pending[key] = _Tally()
        tally.labelled += 1
        tally.correct += int(correct)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"infergate-canary-{self.model}")

    async def stop(self) -> None:
        """Stop ticking, flush what is counted and hand the lease back so another replica leads at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self._flush()
            if self._leader:
                await self._script(_RELEASE)(keys=[lease_key(self.model)], args=[self._store.replica_id])
        except (RedisError, OSError, GatewayError):
            pass  # Redis is down: the lease expires by itself
        self._leader = False

    async def _run(self) -> None:
        while True:
            await self.tick()
            raise_if_cancel_requested()  # stop()'s cancel can be lost in a Redis call of the tick
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        """One round: flush observations, hold or seek the lease, and drive the run when leader."""
        try:
            await self._flush()
            self._leader = await self._hold_lease()
            if self._leader:
                await self._drive()
            state = await self._read_state()
            if state is not None:
                metrics.CANARY_STATE.labels(self.model, state.candidate).set(state.current_percent)
            self._outage_logged = False
        except (RedisError, OSError, GatewayError) as exc:
            self._leader = False
            if not self._outage_logged:
                log.warning("canary %s: cannot reach Redis or change the route (%s); paused", self.model, exc)
                self._outage_logged = True

    # -- observations --------------------------------------------------------------------------

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        ttl_s = max(60, int(self.config.interval_s * 10))
        async with self._store.client.pipeline(transaction=False) as pipe:
            for (window, variant), tally in pending.items():
                key = window_key(self.model, window)
                if tally.requests:
                    pipe.hincrby(key, f"{variant}:n", tally.requests)
                if tally.labelled:
                    pipe.hincrby(key, f"{variant}:lab", tally.labelled)
                    pipe.hincrby(key, f"{variant}:ok", tally.correct)
                if tally.errors:
                    pipe.hincrby(key, f"{variant}:err", tally.errors)
                for bucket, count in tally.latency.items():
                    pipe.hincrby(key, f"{variant}:b{bucket}", count)
                pipe.expire(key, ttl_s)
            await pipe.execute()

    async def window_stats(self, window: int) -> tuple[VariantStats, VariantStats]:
        """The fleet's (baseline, candidate) numbers for ``window``."""
        fields = await self._store.client.hgetall(window_key(self.model, window))
        return VariantStats.from_fields(self.baseline, fields), VariantStats.from_fields(self.config.candidate, fields)

    # -- leadership ----------------------------------------------------------------------------

    async def _hold_lease(self) -> bool:
        """Renew the lease if this replica holds it (also after an outage), else try to take it."""
        ttl_ms = int(self.config.lease_ttl_s * 1000)
        me = self._store.replica_id
        if await self._script(_RENEW)(keys=[lease_key(self.model)], args=[me, ttl_ms]):
            return True
        return bool(await self._store.client.set(lease_key(self.model), me, nx=True, px=ttl_ms))

    def _script(self, source: str):
        client = self._store.client
        cached = self._scripts.get(source)
        if cached is None or cached[0] is not client:
            cached = self._scripts[source] = (client, client.register_script(source))
        return cached[1]

    async def leader(self) -> str:
        """The replica id holding the lease ("" when none)."""
        with redis_errors(f"read the canary lease of {self.model!r}"):
            return await self._store.client.get(lease_key(self.model)) or ""

    # -- the run -------------------------------------------------------------------------------

    async def status(self) -> CanaryState | None:
        with redis_errors(f"read the canary state of {self.model!r}"):
            return await self._read_state()

    async def _read_state(self) -> CanaryState | None:
        fields = await self._store.client.hgetall(state_key(self.model))
        if not fields:
            return None
        state = CanaryState.from_fields(fields)
        if state.fingerprint == self.fingerprint:
            self._known = state
        return state

    async def _write_state(self, state: CanaryState) -> None:
        await self._store.client.hset(state_key(self.model), mapping=state.to_fields())
        self._known = state
        metrics.CANARY_STATE.labels(self.model, state.candidate).set(state.current_percent)

    def _window(self) -> int:
        return int(self._wall_clock() // self.config.interval_s)

    async def _drive(self) -> None:
        state = await self._read_state()
        route = await self._store.read_route(self.model)
        if state is None and self._known is not None:
            # Redis lost the run (it came back empty): carry on from this replica's copy, never from step one.
            state = self._known
            await self._write_state(state)
            log.warning("canary %s: run state missing in Redis; restored this replica's copy (%s at %d%%)",
                        self.model, state.state, state.current_percent)
        if state is None or state.fingerprint != self.fingerprint:
            await self._begin(route)
            return
        if state.state != PROGRESSING:
            return
        if route.revision != state.revision:
            await self._end_by_hand(state, route)
            return
        closed = self._window() - 1
        if closed <= state.judged_window:
            return
        # Every replica flushes each tick: give the last flush of the closed window time to land.
        if self._wall_clock() < (closed + 1) * self.config.interval_s + 1.5 * self.tick_s:
            return
        baseline, candidate = await self.window_stats(closed)
        verdict = judge(self.config, baseline, candidate)
        log.info("canary %s window %d at %d%%: %s", self.model, closed, state.current_percent, verdict.reason)
        state = replace(state, stats_window=closed, baseline_stats=baseline, candidate_stats=candidate,
                        verdict={None: "waiting", True: "healthy", False: "unhealthy"}[verdict.healthy])
        if verdict.healthy is None:
            await self._write_state(replace(state, judged_window=closed, last_reason=verdict.reason))
        elif not verdict.healthy:
            reason = f"rolled back at {state.current_percent}%: {verdict.reason}"
            await self._set_percent(state, route, 0, ROLLED_BACK, state.step_index, reason, "canary_rollback")
        elif state.step_index + 1 < len(self.config.steps_percent):
            step = state.step_index + 1
            percent = self.config.steps_percent[step]
            status = PROMOTED if percent == 100 else PROGRESSING
            reason = f"step {step + 1}/{len(self.config.steps_percent)} to {percent}%: {verdict.reason}"
            await self._set_percent(state, route, percent, status, step, reason, "canary_step")
        else:
            reason = f"promoted after the last step: {verdict.reason}"
            await self._set_percent(state, route, 100, PROMOTED, state.step_index, reason, "canary_promote")

    async def _begin(self, route: Route) -> None:
        percent = self.config.steps_percent[0]
        state = CanaryState(self.fingerprint, self.config.candidate, judged_window=self._window())
        status = PROMOTED if percent == 100 else PROGRESSING
        reason = f"canary of {self.config.candidate} started: step 1/{len(self.config.steps_percent)} at {percent}%"
        await self._set_percent(state, route, percent, status, 0, reason, "canary_start")

    async def _set_percent(
        self, state: CanaryState, route: Route, percent: int, status: str, step: int, reason: str, action: str
    ) -> None:
        weights = {self.config.candidate: percent, self.baseline: 100 - percent}
        try:
            changed = await self._store.set_weights(
                self.model, weights, SUBJECT, reason, expected_revision=route.revision, action=action
            )
        except Aborted:
            return  # someone changed the route meanwhile: the next tick sees it
        await self._write_state(
            replace(
                state,
                state=status,
                step_index=step,
                current_percent=percent,
                last_reason=reason,
                judged_window=self._window(),
                revision=changed.revision,
            )
        )
        (log.warning if status == ROLLED_BACK else log.info)("canary %s: %s", self.model, reason)

    async def _end_by_hand(self, state: CanaryState, route: Route) -> None:
        share = route.weights.get(self.config.candidate, 0)
        if share == 0:
            status, what = ROLLED_BACK, "candidate at 0"
        elif share == route.total_weight:
            status, what = PROMOTED, "candidate at 100%"
        else:
            status, what = IDLE, "analysis stopped"
        percent = round(100 * share / route.total_weight) if route.total_weight else 0
        reason = f"route changed by {route.updated_by or 'unknown'} at revision {route.revision}: {what}"
        await self._write_state(replace(state, state=status, current_percent=percent, last_reason=reason, revision=route.revision))
        log.warning("canary %s: %s", self.model, reason)

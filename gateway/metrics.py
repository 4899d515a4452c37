"""Prometheus metrics, all defined here under the names the README's "Observability" section promises.

Recording a metric must never fail or slow a request: these are in-process values only; the HTTP
endpoint is served from its own thread by prometheus-client.

**Several workers, one scrape.** With ``server.workers > 1`` the supervisor process sets
``PROMETHEUS_MULTIPROC_DIR`` before it starts the workers; prometheus-client then keeps every
worker's values in memory-mapped files there (one per process and metric type), and the supervisor
alone serves ``metrics_listen``, summing the workers' files at each scrape (``serve_metrics`` with
``multiprocess=True``). Each gauge says how the workers' values combine (``multiprocess_mode``):
queue depths and in-flight calls add up, a breaker or Redis outage seen by any live worker shows,
weights are the most recent write. With one worker nothing is written to disk.

``_created`` series are not exported: they double the series count and no dashboard uses them.

**Updates on the call path are deferred** (``record``): a served call runs with cold caches, where
each prometheus-client update (a method chain, a lock, a bucket search) cost about 2 µs and the
seven of a plain call 13 µs of its 163 (BENCHMARKS.md, fourth pass). ``record(update, value)``
queues the bound update and its argument; ``flush`` applies what is queued, in a tight loop, before
every collection of the registry (a scrape, ``REGISTRY.get_sample_value``: a collector registered
ahead of every metric flushes first), whenever ``FLUSH_AT`` updates wait, and every
``FLUSH_EVERY_S`` from the serving loop of a worker of several, whose values the supervisor reads
from files (at most that stale there). Only commutative updates are deferred (counter and gauge
``inc``/``dec``, histogram ``observe``), so the order in which two threads apply them does not
matter, and a scrape sees every update made before it began.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from infergate.gateway.config import split_host_port

log = logging.getLogger(__name__)

disable_created_metrics()

FLUSH_AT = 256
"""Deferred updates waiting at most before the call that queues the next one applies them."""
FLUSH_EVERY_S = 0.5
"""How often a worker of several applies its deferred updates (``flush_periodically``)."""

_pending: collections.deque[tuple[Callable[[float], None], float]] = collections.deque()
_queue = _pending.append


def record(update: Callable[[float], None], value: float) -> None:
    """Queue ``update(value)``: a child's ``inc``, ``dec`` or ``observe``, bound once by the caller."""
    _queue((update, value))
    if len(_pending) >= FLUSH_AT:
        flush()


def flush() -> None:
    """Apply every queued update (any thread; each is applied once). An update that raises is
    logged and skipped: recording a metric must not fail the call that queued it, nor a scrape."""
    take = _pending.popleft
    while True:
        try:
            update, value = take()
        except IndexError:
            return
        try:
            update(value)
        except Exception:
            log.exception("metric update %r(%r) failed; skipped", update, value)


class _FlushFirst:
    """Registered before every metric, so that each collection of the registry starts with a flush."""

    def collect(self):
        flush()
        return []


REGISTRY.register(_FlushFirst())

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set (by the supervisor of several workers) before this module is imported: multiprocess mode."""

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

BUILD_INFO = Gauge(
    "infergate_build_info", "Always 1; the labels say which infergate build is running", ["version"],
    multiprocess_mode="max",
)
REQUESTS = Counter(
    "infergate_requests", "Inference calls by model, serving variant and status code", ["model", "variant", "code"]
)
REQUEST_DURATION = Histogram(
    "infergate_request_duration_seconds", "Time from call start to answer", ["model", "variant"], buckets=_LATENCY_BUCKETS_S
)
IN_FLIGHT = Gauge(
    "infergate_in_flight_requests", "Inference calls of a model being served now", ["model"], multiprocess_mode="livesum"
)
BATCH_SIZE = Histogram("infergate_batch_size", "Rows per backend call", ["model", "variant"], buckets=_BATCH_BUCKETS)
QUEUE_DEPTH = Gauge(
    "infergate_queue_depth", "Rows waiting in a variant's batch queue", ["model", "variant"], multiprocess_mode="livesum"
)
QUEUE_CAPACITY = Gauge(
    "infergate_queue_capacity", "Rows a variant's batch queue holds at most (batching.max_queue)", ["model", "variant"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "infergate_queue_wait_seconds", "Time a request waited in the batch queue", ["model", "variant"], buckets=_LATENCY_BUCKETS_S
)
BACKEND_DURATION = Histogram(
    "infergate_backend_duration_seconds", "Duration of one backend call", ["backend"], buckets=_LATENCY_BUCKETS_S
)
FEATURE_FETCH_DURATION = Histogram(
    "infergate_feature_fetch_duration_seconds", "Duration of one feature fetch", ["view"], buckets=_LATENCY_BUCKETS_S
)
ROUTE_WEIGHT = Gauge(
    "infergate_route_weight", "Current weight of a variant", ["model", "variant"], multiprocess_mode="livemostrecent"
)
SHADOW_DIVERGENCE = Histogram(
    "infergate_shadow_divergence",
    "Max absolute difference between live and shadow answers",
    ["model", "variant"],
    buckets=(0, 1e-6, 1e-4, 1e-2, 0.1, 1, 10),
)
SHADOW_REQUESTS = Counter("infergate_shadow_requests", "Shadow copies by outcome", ["model", "variant", "outcome"])
BREAKER_OPEN = Gauge(
    "infergate_breaker_open", "1 while a backend's circuit breaker is open", ["backend"], multiprocess_mode="livemax"
)
BREAKER_STATE = Gauge(
    "infergate_breaker_state",
    "1 for the state a backend's circuit breaker is in (closed, open, half_open), 0 for the others",
    ["backend", "state"],
    multiprocess_mode="livemax",
)
BREAKER_STATES = ("closed", "open", "half_open")
FALLBACKS = Counter("infergate_fallbacks", "Calls served by a fallback variant", ["model", "variant", "fallback"])
CANARY_STATE = Gauge(
    "infergate_canary_percent", "Candidate weight set by the canary controller", ["model", "variant"],
    multiprocess_mode="livemostrecent",
)
AUTH_REJECTIONS = Counter("infergate_auth_rejections", "Calls refused by auth or tenant rate limits", ["reason"])
INFLIGHT_REQUEST_BYTES = Gauge(
    "infergate_inflight_request_bytes", "Wire bytes of the requests being served", multiprocess_mode="livesum"
)
MEMORY_REFUSALS = Counter("infergate_memory_refusals", "Requests refused because the in-flight byte budget was full")
REDIS_UP = Gauge(
    "infergate_redis_up",
    "1 while a Redis client (client=route_store) holds a live connection, 0 while it cannot reach Redis",
    ["client"],
    multiprocess_mode="livemin",
)

# Model monitoring (gateway/monitor.py); label values are bounded by the config (tensors, indexes, classes).
DRIFT_PSI = Gauge(
    "infergate_drift_psi",
    "Population stability index of sampled values against the reference profile",
    ["model", "variant", "tensor", "index"],
    multiprocess_mode="livemax",
)
MONITOR_SAMPLED_ROWS = Counter(
    "infergate_monitor_sampled_rows", "Rows taken into the drift histograms", ["model", "variant"]
)
CLASS_SHARE = Gauge(
    "infergate_class_share", "Share of sampled predictions per class", ["model", "variant", "class"],
    multiprocess_mode="livemax",
)
CLASS_SHARE_SHIFT = Gauge(
    "infergate_class_share_shift",
    "Total variation distance between a variant's predicted-class shares and the baseline variant's",
    ["model", "variant"],
    multiprocess_mode="livemax",
)
ACCURACY = Gauge(
    "infergate_accuracy", "Share of correct predictions among the last labelled ones (feedback RPC)",
    ["model", "variant"], multiprocess_mode="livemin",
)
FEEDBACK = Counter(
    "infergate_feedback", "Labels received by the feedback RPC, by outcome", ["model", "variant", "outcome"]
)


def set_breaker_state(backend: str, state: str) -> None:
    """Record a breaker's state (one of ``BREAKER_STATES``) in both breaker gauges."""
    for name in BREAKER_STATES:
        BREAKER_STATE.labels(backend, name).set(1 if name == state else 0)
    BREAKER_OPEN.labels(backend).set(1 if state == "open" else 0)


async def flush_periodically(every_s: float = FLUSH_EVERY_S) -> None:
    """Apply the deferred updates every ``every_s`` until cancelled (a worker of several: the
    supervisor's scrape reads files, not this process's queue), and once more on the way out."""
    try:
        while True:
            await asyncio.sleep(every_s)
            flush()
    finally:
        flush()


def multiprocess_mode() -> bool:
    """Whether this process records into ``PROMETHEUS_MULTIPROC_DIR`` (a worker of several)."""
    return bool(os.environ.get(MULTIPROCESS_DIR_ENV))


def serve_metrics(listen: str, multiprocess: bool = False) -> int:
    """Start the Prometheus HTTP endpoint on ``host:port``; return the bound port.

    ``multiprocess``: serve the sum of every worker's files in ``PROMETHEUS_MULTIPROC_DIR``
    (the supervisor of several workers) instead of this process's own values.
    """
    registry = REGISTRY
    if multiprocess:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
    host, port = split_host_port(listen)
    server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    return server.server_address[1]


def exported_names() -> set[str]:
    """Every sample name this module can export (``_total``, ``_bucket``... included)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for metric in (value for value in globals().values() if isinstance(value, (Counter, Gauge, Histogram))):
        for family in metric.describe():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names

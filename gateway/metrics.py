"""Prometheus metrics, all defined here under the names the README's "Observability" section promises.

Recording a metric must never fail or slow a request: these are in-process counters only; the
HTTP endpoint is served from its own thread by prometheus-client.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from infergate.gateway.config import split_host_port

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter(
    "infergate_requests", "Inference calls by model, serving variant and status code", ["model", "variant", "code"]
)
REQUEST_DURATION = Histogram(
    "infergate_request_duration_seconds", "Time from call start to answer", ["model", "variant"], buckets=_LATENCY_BUCKETS_S
)
BATCH_SIZE = Histogram("infergate_batch_size", "Rows per backend call", ["model", "variant"], buckets=_BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("infergate_queue_depth", "Rows waiting in a variant's batch queue", ["model", "variant"])
QUEUE_WAIT = Histogram(
    "infergate_queue_wait_seconds", "Time a request waited in the batch queue", ["model", "variant"], buckets=_LATENCY_BUCKETS_S
)
BACKEND_DURATION = Histogram(
    "infergate_backend_duration_seconds", "Duration of one backend call", ["backend"], buckets=_LATENCY_BUCKETS_S
)
FEATURE_FETCH_DURATION = Histogram(
    "infergate_feature_fetch_duration_seconds", "Duration of one feature fetch", ["view"], buckets=_LATENCY_BUCKETS_S
)
ROUTE_WEIGHT = Gauge("infergate_route_weight", "Current weight of a variant", ["model", "variant"])
SHADOW_DIVERGENCE = Histogram(
    "infergate_shadow_divergence",
    "Max absolute difference between live and shadow answers",
    ["model", "variant"],
    buckets=(0, 1e-6, 1e-4, 1e-2, 0.1, 1, 10),
)
SHADOW_REQUESTS = Counter("infergate_shadow_requests", "Shadow copies by outcome", ["model", "variant", "outcome"])
BREAKER_OPEN = Gauge("infergate_breaker_open", "1 while a backend's circuit breaker is open", ["backend"])
FALLBACKS = Counter("infergate_fallbacks", "Calls served by a fallback variant", ["model", "variant", "fallback"])
CANARY_STATE = Gauge("infergate_canary_percent", "Candidate weight set by the canary controller", ["model", "variant"])
AUTH_REJECTIONS = Counter("infergate_auth_rejections", "Calls refused by auth or tenant rate limits", ["reason"])


def serve_metrics(listen: str) -> int:
    """Start the Prometheus HTTP endpoint on ``host:port``; return the bound port."""
    host, port = split_host_port(listen)
    server, _thread = start_http_server(port, addr=host or "0.0.0.0")
    return server.server_address[1]

"""A closed-loop (or fixed-rate) load generator speaking the inference protocol.

``run_load`` drives one target with ``concurrency`` callers for ``duration_s`` using the
unmodified ``tritonclient.grpc.aio`` client (one channel shared by the callers, like a real
service), optionally at a fixed total ``rate`` (requests/s, open loop). It returns a ``LoadResult``
with throughput, latency percentiles and errors by status code. Run it in a process of its own so
the load generator and the server under test do not share one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

InputFactory = Callable[[int], list]
"""Given a caller index, the list of ``tritonclient.grpc.InferInput`` for one request."""


@dataclass
class LoadResult:
    target: str
    concurrency: int
    rate: float
    """Requested total rate in requests/s; 0 for closed loop (each caller as fast as it can)."""
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    error_codes: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    duration_s: float = 0.0

    def row(self) -> dict:
        return asdict(self)


def single_row_inputs(features: int = 16, input_name: str = "INPUT", seed: int = 0) -> InputFactory:
    """Inputs of one FP32 row of ``features`` values, built once per caller and reused."""
    from tritonclient.grpc import InferInput

    rng = np.random.default_rng(seed)
    cache: dict[int, list] = {}

    def make(caller: int) -> list:
        inputs = cache.get(caller)
        if inputs is None:
            tensor = InferInput(input_name, [1, features], "FP32")
            tensor.set_data_from_numpy(rng.normal(size=(1, features)).astype(np.float32))
            inputs = cache[caller] = [tensor]
        return inputs

    return make


async def run_load(
    url: str,
    model: str,
    concurrency: int,
    duration_s: float,
    make_inputs: InputFactory,
    target: str = "",
    rate: float = 0.0,
    warmup_s: float = 1.0,
    headers: dict[str, str] | None = None,
    outputs: Sequence[str] = (),
    timeout_s: float = 10.0,
    ssl: dict | None = None,
) -> LoadResult:
    """Drive ``model`` at ``url``; latencies of the warm-up period are discarded."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url, **(ssl or {}))
    requested = [InferRequestedOutput(name) for name in outputs] or None
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    interval = concurrency / rate if rate > 0 else 0.0

    async def caller(index: int) -> None:
        next_send = start + (interval * index / concurrency if interval else 0.0)
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            if interval:
                if next_send > now:
                    await asyncio.sleep(next_send - now)
                next_send += interval
            sent = time.perf_counter()
            try:
                await client.infer(model, make_inputs(index), outputs=requested, headers=headers, client_timeout=timeout_s)
                code = "OK"
            except InferenceServerException as exc:
                code = (exc.status() or "StatusCode.UNKNOWN").removeprefix("StatusCode.")
            done = time.perf_counter()
            if sent >= measure_from and done <= stop_at:
                latencies.append(done - sent)
                codes[code] += 1

    try:
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    finally:
        await client.close()
    measured = sum(codes.values())
    lat_ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    errors = measured - codes.get("OK", 0)
    return LoadResult(
        target=target or url,
        concurrency=concurrency,
        rate=rate,
        rps=round(codes.get("OK", 0) / duration_s, 1),
        p50_ms=round(float(np.percentile(lat_ms, 50)), 3),
        p90_ms=round(float(np.percentile(lat_ms, 90)), 3),
        p99_ms=round(float(np.percentile(lat_ms, 99)), 3),
        p999_ms=round(float(np.percentile(lat_ms, 99.9)), 3),
        errors=errors,
        error_codes={k: v for k, v in codes.items() if k != "OK"},
        requests=measured,
        duration_s=duration_s,
    )

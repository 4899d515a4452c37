"""A closed-loop (or fixed-rate) load generator speaking the inference protocol.

Two ways to call, one caller loop (``drive``):

- ``raw`` (what ``infergate bench`` uses by default): a ``grpc.aio`` channel sending one
  ``ModelInferRequest`` serialized once, through a generic unary-unary call with bytes in and bytes
  out. The load generator then spends almost nothing per call beyond grpc itself, so it is not the
  bottleneck when it measures a fast server.
- ``tritonclient``: the unmodified ``tritonclient.grpc.aio`` client, building each request as an
  application would.

Callers share one channel (like a real service) and run closed loop, or at a fixed total ``rate``
(requests/s, open loop). Every process uses ``time.monotonic`` (one clock for the whole machine),
so several load processes, and the bench reading server CPU time, agree on when the measured window
starts and ends. Only calls sent and answered inside the window count; failed calls count as
errors by status code and stay out of the latency figures.

``run_load`` keeps the original one-call API (tritonclient, one process) for the scripts in this
folder.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

InputFactory = Callable[[int], list]
"""Given a caller index, the list of ``tritonclient.grpc.InferInput`` for one request."""

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODES = ("raw", "tritonclient")

Call = Callable[[int], Awaitable[tuple[str, str]]]
"""One request by caller ``index``: ("OK", "") or (status code name, message)."""


@dataclass
class LoadResult:
    target: str
    concurrency: int
    rate: float
    """Requested total rate in requests/s; 0 for closed loop (each caller as fast as it can)."""
    rps: float
    """Successful calls per second of the measured window."""
    p50_ms: float
    """Latency percentiles of the successful calls only (0 when none succeeded)."""
    p90_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    error_codes: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    duration_s: float = 0.0
    first_error: str = ""
    """"CODE: message" of the first failed call, empty when none failed."""

    def row(self) -> dict:
        return asdict(self)


@dataclass
class Tally:
    """What one load process saw in the measured window (picklable, merged by ``summarize``)."""

    latencies_s: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    first_error: str = ""
    cpu_s: float = 0.0
    """CPU time this load process used during the window (its own busy-ness)."""


@dataclass(frozen=True)
class LoadSpec:
    """What to send where: picklable, so that load processes can build their own channel from it."""

    url: str
    model: str
    mode: str = "raw"
    features: int = 16
    input_name: str = "INPUT"
    headers: tuple[tuple[str, str], ...] = ()
    tls: object | None = None
    """An ``infergate.gateway.tls.ClientTls``, or None for plaintext."""
    timeout_s: float = 10.0


def serialized_request(model: str, features: int = 16, input_name: str = "INPUT", seed: int = 0) -> bytes:
    """One ``ModelInferRequest`` of one FP32 row, in raw contents, as bytes on the wire."""
    from infergate.gateway._proto.inference import grpc_service_pb2 as pb

    row = np.random.default_rng(seed).normal(size=(1, features)).astype(np.float32)
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=input_name, datatype="FP32", shape=[1, features])],
        raw_input_contents=[row.tobytes()],
    )
    return request.SerializeToString()


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


async def drive(call: Call, concurrency: int, start: float, warmup_s: float, duration_s: float, rate: float = 0.0) -> Tally:
    """``concurrency`` callers from monotonic time ``start``; calls inside [start + warmup, + duration] count."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    interval = concurrency / rate if rate > 0 else 0.0
    cpu_marks: list[float] = []
    loop.call_at(measure_from, lambda: cpu_marks.append(time.process_time()))
    loop.call_at(stop_at, lambda: cpu_marks.append(time.process_time()))
    if start > time.monotonic():
        await asyncio.sleep(start - time.monotonic())

    async def caller(index: int) -> None:
        next_send = start + (interval * index / concurrency if interval else 0.0)
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            if interval:
                if next_send > now:
                    await asyncio.sleep(next_send - now)
                next_send += interval
            sent = time.monotonic()
            code, message = await call(index)
            done = time.monotonic()
            if sent >= measure_from and done <= stop_at:
                tally.codes[code] += 1
                if code == "OK":
                    tally.latencies_s.append(done - sent)
                elif not tally.first_error:
                    tally.first_error = f"{code}: {message}"

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    if len(cpu_marks) < 2:  # the end mark is due at stop_at; a caller may return just before it
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()) + 0.001)
    if len(cpu_marks) == 2:
        tally.cpu_s = cpu_marks[1] - cpu_marks[0]
    return tally


def summarize(target: str, concurrency: int, rate: float, duration_s: float, tallies: Sequence[Tally]) -> LoadResult:
    """One result from the tallies of every load process of one run."""
    codes: Counter = Counter()
    latencies: list[float] = []
    first_error = ""
    for tally in tallies:
        codes.update(tally.codes)
        latencies.extend(tally.latencies_s)
        first_error = first_error or tally.first_error
    ok = codes.get("OK", 0)
    lat_ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    measured = sum(codes.values())
    return LoadResult(
        target=target,
        concurrency=concurrency,
        rate=rate,
        rps=round(ok / duration_s, 1),
        p50_ms=round(float(np.percentile(lat_ms, 50)), 3),
        p90_ms=round(float(np.percentile(lat_ms, 90)), 3),
        p99_ms=round(float(np.percentile(lat_ms, 99)), 3),
        p999_ms=round(float(np.percentile(lat_ms, 99.9)), 3),
        errors=measured - ok,
        error_codes={k: v for k, v in codes.items() if k != "OK"},
        requests=measured,
        duration_s=duration_s,
        first_error=first_error,
    )


class Caller:
    """An open connection to one target that makes calls the way ``spec.mode`` says; ``close`` it."""

    def __init__(self, spec: LoadSpec) -> None:
        if spec.mode not in MODES:
            raise ValueError(f"unknown load mode {spec.mode!r}; known: {', '.join(MODES)}")
        self.spec = spec
        self._channel = None
        self._client = None
        if spec.mode == "raw":
            import grpc

            from infergate.gateway.tls import open_channel

            self._grpc_error = grpc.aio.AioRpcError
            self._channel = open_channel(spec.url, spec.tls)
            self._infer = self._channel.unary_unary(MODEL_INFER)  # no serializers: bytes in, bytes out
            self._request = serialized_request(spec.model, spec.features, spec.input_name)
            self._metadata = spec.headers or None
            self.call = self._raw
        else:
            import tritonclient.grpc.aio as grpcclient
            from tritonclient.utils import InferenceServerException

            self._triton_error = InferenceServerException
            tls = spec.tls.tritonclient_kwargs() if spec.tls is not None else {}
            self._client = grpcclient.InferenceServerClient(spec.url, **tls)
            self._inputs = single_row_inputs(spec.features, spec.input_name)
            self._headers = dict(spec.headers) or None
            self.call = self._tritonclient

    async def _raw(self, index: int) -> tuple[str, str]:
        try:
            await self._infer(self._request, metadata=self._metadata, timeout=self.spec.timeout_s)
        except self._grpc_error as exc:
            return exc.code().name, exc.details() or ""
        return "OK", ""

    async def _tritonclient(self, index: int) -> tuple[str, str]:
        try:
            await self._client.infer(
                self.spec.model, self._inputs(index), headers=self._headers, client_timeout=self.spec.timeout_s
            )
        except self._triton_error as exc:
            code = (exc.status() or "StatusCode.UNKNOWN").removeprefix("StatusCode.")
            return code, exc.message() or str(exc)
        return "OK", ""

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._client is not None:
            await self._client.close()


async def probe(spec: LoadSpec) -> tuple[str, str]:
    """One call as the load will make it: ("OK", "") or the status code name and message."""
    caller = Caller(spec)
    try:
        return await caller.call(0)
    finally:
        await caller.close()


async def run_share(spec: LoadSpec, concurrency: int, rate: float, start: float, warmup_s: float, duration_s: float) -> Tally:
    """This process's share of one run: ``concurrency`` callers on one channel."""
    caller = Caller(spec)
    try:
        return await drive(caller.call, concurrency, start, warmup_s, duration_s, rate)
    finally:
        await caller.close()


def run_share_blocking(spec: LoadSpec, concurrency: int, rate: float, start: float, warmup_s: float, duration_s: float) -> Tally:
    """``run_share`` in a fresh event loop: what a load process of a pool runs."""
    return asyncio.run(run_share(spec, concurrency, rate, start, warmup_s, duration_s))


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
    """Drive ``model`` at ``url`` with tritonclient in this process; latencies of the warm-up are discarded."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url, **(ssl or {}))
    requested = [InferRequestedOutput(name) for name in outputs] or None

    async def call(index: int) -> tuple[str, str]:
        try:
            await client.infer(model, make_inputs(index), outputs=requested, headers=headers, client_timeout=timeout_s)
        except InferenceServerException as exc:
            return (exc.status() or "StatusCode.UNKNOWN").removeprefix("StatusCode."), exc.message() or str(exc)
        return "OK", ""

    try:
        tally = await drive(call, concurrency, time.monotonic(), warmup_s, duration_s, rate)
    finally:
        await client.close()
    return summarize(target or url, concurrency, rate, duration_s, [tally])

"""The inference servicer: Triton's GRPCInferenceService over the gateway's pipeline.

Each method converts the message, calls the pipeline and converts back. ``status_boundary`` is
the one place where exceptions become gRPC statuses: a ``GatewayError`` keeps its code and
message, anything else is logged with its traceback and reported as INTERNAL with a short message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from infergate.gateway import __version__
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
from infergate.gateway.converters import (
    decode_infer_request,
    encode_infer_response,
    encode_model_config,
    encode_model_metadata,
)
from infergate.gateway.admission import MemoryBudget
from infergate.gateway.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    GatewayError,
    Internal,
    NotFound,
    PermissionDenied,
    Unavailable,
    Unimplemented,
)
from infergate.gateway.config import TelemetryConfig
from infergate.gateway.identity import Identity, auth_window_ns, current_identity
from infergate.gateway.logs import RefusedCalls
from infergate.gateway.telemetry import (
    AUTH_SPAN,
    RPC_ATTRIBUTES,
    SERVER_SPAN,
    Tracing,
    mark_error,
    outgoing_headers,
    stage_span,
)
from infergate.gateway.pipeline import CallContext, ModelEndpoint, Pipeline

log = logging.getLogger(__name__)

RATE_LIMITED_MESSAGE = "tenant over its request rate"

STREAM_MAX_IN_FLIGHT = 256
"""Requests of one stream processed at once; the stream reader waits beyond it."""
DRAIN_QUIET_S = 0.5
"""On shutdown, the notice period ends early once no call has finished or been refused for this long."""
_DRAINED = object()
"""Put on an open stream's answer queue when the drain is over: the stream ends UNAVAILABLE."""


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a caller sees for ``exc``."""
    if isinstance(exc, GatewayError):
        return exc.code, exc.message
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


@contextlib.asynccontextmanager
async def status_boundary(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Turn exceptions raised inside into the caller's status (and never a traceback)."""
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:  # the single mapping point
        code, message = to_status(exc)
        await context.abort(code, message)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        default_deadline_ms: int,
        is_ready: Callable[[], bool],
        tracing: Tracing | None = None,
        admit_message: Callable[[Identity], bool] | None = None,
        memory: MemoryBudget | None = None,
        refused: RefusedCalls | None = None,
    ) -> None:
        """``admit_message(identity)``: whether a stream's next message is within its tenant's rate.
        ``refused``: records the calls refused here, before routing (default: counted, not logged)."""
        self._pipeline = pipeline
        self._refused = refused or RefusedCalls(pipeline.endpoints)
        self._admit_message = admit_message
        self._memory = memory
        self._tracing = tracing or Tracing(TelemetryConfig())
        self._default_deadline_s = default_deadline_ms / 1000
        self._is_ready = is_ready
        self._in_flight = 0
        self._idle: asyncio.Event | None = None  # created by drain(), inside the loop
        self._streams: set[asyncio.Queue] = set()
        """The answer queues of the open ModelStreamInfer calls (the drain ends them)."""
        self._last_activity = float("-inf")
        """When an inference call last finished or was refused (time.monotonic)."""

    async def drain(self, timeout_s: float, notice_s: float = 0.0) -> bool:
        """Wait for in-flight inference to finish (at most ``timeout_s``), then a notice period,
        then end the open streams with UNAVAILABLE; True when no call was left in progress.

        The caller has made ``is_ready`` false first, so new calls are already refused with
        UNAVAILABLE here while the server still accepts them. The notice period lets load
        balancers see NOT_SERVING and move away: at most ``notice_s`` (never past ``timeout_s``),
        and over as soon as callers have been quiet for ``DRAIN_QUIET_S``. It is bounded: refused
        calls do not extend it, so a replica under steady traffic exits promptly too.
        """
        deadline = time.monotonic() + timeout_s
        drained = True
        if self._in_flight:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can lose a cancel
                    await self._idle.wait()
            except TimeoutError:
                log.warning("%d inference call(s) still in progress after %.1fs of drain", self._in_flight, timeout_s)
                drained = False
        notice_end = min(deadline, time.monotonic() + notice_s)
        while drained:
            now = time.monotonic()
            quiet_s = now - self._last_activity
            if quiet_s >= DRAIN_QUIET_S or now >= notice_end:
                break
            await asyncio.sleep(min(DRAIN_QUIET_S - quiet_s, notice_end - now))
        for answers in self._streams:
            answers.put_nowait(_DRAINED)
        return drained

    # -- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):
        async with status_boundary(context):
            endpoint = self._endpoint(request.name, request.version, loaded=False, refused_ok=True)
            return pb.ModelReadyResponse(ready=self._is_ready() and await self._any_variant_ready(endpoint))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="infergate", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        async with status_boundary(context):
            endpoint = self._endpoint(request.name, request.version)
            return encode_model_metadata(endpoint.name, endpoint.signature)

    async def ModelConfig(self, request, context):
        async with status_boundary(context):
            endpoint = self._endpoint(request.name, request.version)
            batching = endpoint.config.batching
            return encode_model_config(
                endpoint.name,
                endpoint.signature,
                endpoint.max_batch_size,
                batching.max_delay_us if batching else None,
                batching.preferred_batch_sizes if batching else (),
            )

    async def ModelStatistics(self, request, context):
        async with status_boundary(context):
            if request.name:
                endpoints = [self._endpoint(request.name, request.version)]
            else:
                identity = current_identity.get()
                endpoints = [e for e in self._pipeline.endpoints.values() if identity.may_infer(e.name)]
            response = pb.ModelStatisticsResponse()
            for endpoint in endpoints:
                stats = endpoint.stats
                entry = response.model_stats.add(
                    name=endpoint.name,
                    version="1",
                    last_inference=stats.last_inference_ms,
                    inference_count=stats.inference_count,
                    execution_count=stats.execution_count,
                )
                entry.inference_stats.success.count = stats.success_count
                entry.inference_stats.success.ns = stats.success_ns
                entry.inference_stats.fail.count = stats.fail_count
                entry.inference_stats.fail.ns = stats.fail_ns
            return response

    # -- inference -----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context)
        except GatewayError as exc:  # the common failure, mapped here without a context manager's frames
            await context.abort(exc.code, exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = to_status(exc)
            await context.abort(code, message)

    async def ModelStreamInfer(self, request_iterator, context):
        """One response per request, in completion order; errors travel as ``error_message``.

        Backpressure: a request holds one of ``STREAM_MAX_IN_FLIGHT`` slots from being read until
        its answer has been handed to grpc, so a client that sends without reading stops being
        read (HTTP/2 flow control then holds it) instead of growing a queue of answers. Each
        message after the first is charged to the tenant's rate (``admit_message``; opening the
        stream charged the first). A message that cannot be decoded, or any failure of the reader,
        ends the stream with its status.
        """
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT)
        identity = current_identity.get()

        async def answer(request, reserved: int) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                response = error_response(request, to_status(exc)[1])
            responses.put_nowait((response, reserved))

        def error_response(request, message: str) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(
                error_message=message,
                infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
            )

        held = 0  # bytes of this stream's requests in the memory budget, given back as answers are written

        async def read() -> None:
            nonlocal held
            first = True
            async for request in request_iterator:
                await slots.acquire()
                if not first and self._admit_message is not None and not self._admit_message(identity):
                    self._refused.record(request.model_name, "RESOURCE_EXHAUSTED", identity, request.id)
                    responses.put_nowait((error_response(request, RATE_LIMITED_MESSAGE), 0))
                    continue
                first = False
                reserved = 0
                if self._memory is not None:  # held until the answer is written
                    size = request.ByteSize()
                    try:
                        self._memory.reserve(size)
                    except ResourceExhausted as exc:
                        self._refused.record(request.model_name, exc.code.name, identity, request.id)
                        responses.put_nowait((error_response(request, exc.message), 0))
                        continue
                    reserved = size
                    held += size
                task = asyncio.create_task(answer(request, reserved))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _task: responses.put_nowait(None))
        self._streams.add(responses)
        try:
            async with status_boundary(context):
                while True:
                    response = await responses.get()
                    if response is None:
                        break
                    if response is _DRAINED:
                        raise Unavailable("the gateway is shutting down; open the stream on another replica")
                    response, reserved = response
                    try:
                        yield response
                    finally:
                        slots.release()
                        if reserved:
                            self._memory.release(reserved)
                            held -= reserved
                await reader  # re-raises a reader failure (a malformed message has already aborted the call)
        finally:
            self._streams.discard(responses)
            for task in (reader, *tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            if held:  # answers never written (the caller left): their requests leave the budget too
                self._memory.release(held)

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """One inference request (unary, or one of a stream): counted for the drain, traced when on."""
        if not self._is_ready():
            self._last_activity = time.monotonic()
            self._refused.record(request.model_name, "UNAVAILABLE", current_identity.get(), request.id)
            raise Unavailable("the gateway is not serving (shutting down or starting); try another replica")
        self._in_flight += 1
        try:
            metadata = dict(context.invocation_metadata() or ())  # gRPC metadata keys are lower-case
            if not self._tracing.enabled or not self._tracing.sampled(metadata):
                return await self._serve(request, context, metadata, _forwarded(metadata))
            attributes = {"infergate.model": request.model_name, **RPC_ATTRIBUTES}
            with self._tracing.server_span(SERVER_SPAN, metadata, attributes) as span:
                window = auth_window_ns.get()
                if window is not None and span.is_recording():
                    stage_span(self._tracing.tracer, AUTH_SPAN, window[0], window[1])
                try:
                    response = await self._serve(request, context, metadata, outgoing_headers())
                except GatewayError as exc:
                    mark_error(span, exc.code, exc.message)
                    raise
                if span.is_recording():
                    span.set_attribute("infergate.variant", response.parameters["variant"].string_param)
                    span.set_attribute("rpc.grpc.status_code", 0)
                return response
        finally:
            self._in_flight -= 1
            self._last_activity = time.monotonic()
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def _serve(self, request: pb.ModelInferRequest, context, metadata: dict, headers) -> pb.ModelInferResponse:
        try:
            endpoint = self._endpoint(request.model_name, request.model_version)
            decoded = decode_infer_request(request, endpoint.signature, endpoint.max_batch_size)
            remaining = context.time_remaining()
            if remaining is None:
                remaining = self._default_deadline_s
            elif remaining <= 0:
                raise DeadlineExceeded("deadline passed before the gateway received the call")
        except Exception as exc:  # refused before routing: recorded here (the pipeline records the rest)
            code = exc.code.name if isinstance(exc, GatewayError) else "INTERNAL"
            self._refused.record(request.model_name, code, current_identity.get(), request.id)
            raise
        ctx = CallContext(
            metadata, decoded.parameters, time.monotonic() + remaining, current_identity.get(), headers, request.id
        )
        result = await self._pipeline.infer(endpoint, decoded.inputs, decoded.outputs, ctx, decoded.rows)
        return encode_infer_response(endpoint.name, request.id, result.outputs, result.variant)

    # -- everything Triton has that a gateway does not offer -------------------------------------

    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=name, version="1", state="READY")
                for name in self._pipeline.endpoints
                if current_identity.get().may_infer(name)
            ]
        )

    async def _unsupported(self, request, context):
        async with status_boundary(context):
            raise Unimplemented("not offered by the infergate gateway")

    RepositoryModelLoad = RepositoryModelUnload = _unsupported
    SystemSharedMemoryStatus = SystemSharedMemoryRegister = SystemSharedMemoryUnregister = _unsupported
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _unsupported
    TraceSetting = LogSettings = _unsupported

    # -- helpers -------------------------------------------------------------------------------

    def _endpoint(self, model: str, version: str = "", loaded: bool = True, refused_ok: bool = False) -> ModelEndpoint:
        """The model's endpoint; with ``loaded``, UNAVAILABLE while none of its variants could be
        loaded; unless ``refused_ok``, UNAVAILABLE when every variant's file was refused."""
        # Checked before the lookup: without `infer:*` an unknown model looks forbidden, so names
        # cannot be probed. This also covers an `x-infergate-variant` pin, which needs `infer:<model>`.
        if not current_identity.get().may_infer(model):
            raise PermissionDenied(f"not allowed to use model {model!r}")
        endpoint = self._pipeline.endpoint(model)
        if version not in ("", "1"):
            raise NotFound(f"model {model!r} has no version {version!r}; the gateway serves version 1")
        if endpoint.refusal and not refused_ok:  # no signature to validate against, nothing to serve
            raise Unavailable(f"model {model!r} is not loaded: {endpoint.refusal}")
        if loaded and endpoint.signature is None:  # no variant's backend has been reachable since start
            raise Unavailable(f"model {model!r}: no backend of it is reachable yet")
        return endpoint

    async def _any_variant_ready(self, endpoint: ModelEndpoint) -> bool:
        try:
            return any(
                await asyncio.gather(*(v.backend.ready(v.target) for v in endpoint.variants.values()))
            )
        except Exception as exc:
            raise Internal("readiness check failed") from exc


_FORWARDED = ("traceparent", "tracestate")


def _forwarded(metadata: Mapping[str, str]) -> dict[str, str] | None:
    """With tracing off, the caller's own trace context goes to the backend as it came."""
    if "traceparent" not in metadata:
        return None
    return {key: metadata[key] for key in _FORWARDED if key in metadata}

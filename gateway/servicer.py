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
from collections.abc import AsyncIterator, Callable

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
from infergate.gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    Internal,
    NotFound,
    PermissionDenied,
    Unavailable,
    Unimplemented,
)
from infergate.gateway.config import TelemetryConfig
from infergate.gateway.identity import current_identity
from infergate.gateway.telemetry import Tracing, mark_error
from infergate.gateway.pipeline import CallContext, ModelEndpoint, Pipeline

log = logging.getLogger(__name__)

STREAM_MAX_IN_FLIGHT = 256
"""Requests of one stream processed at once; the stream reader waits beyond it."""
DRAIN_QUIET_S = 0.5
"""On shutdown, the quiet time (no call finished or refused) the drain waits for before the server stops.

A caller answered during the drain that sends its next call within this time hears UNAVAILABLE from
the servicer; one that sends it later, after the server has begun to stop, can meet a transport
race. 0.5 s leaves room for a busy client on a loaded machine and delays an idle stop not at all."""


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


def invocation_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata, keys lower-case."""
    return {key.lower(): value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


def call_context(
    context: grpc.aio.ServicerContext,
    parameters: dict,
    default_deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
    metadata: dict[str, str] | None = None,
) -> CallContext:
    """The call's metadata and one absolute deadline (the caller's, else the default)."""
    if metadata is None:
        metadata = invocation_metadata(context)
    remaining = context.time_remaining()
    timeout = default_deadline_s if remaining is None else min(remaining, 10 * 365 * 86400)
    if timeout <= 0:
        raise DeadlineExceeded("deadline passed before the gateway received the call")
    return CallContext(
        metadata=metadata,
        parameters=parameters,
        deadline=clock() + timeout,
        identity=current_identity.get(),
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        default_deadline_ms: int,
        is_ready: Callable[[], bool],
        tracing: Tracing | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._tracing = tracing or Tracing(TelemetryConfig())
        self._default_deadline_s = default_deadline_ms / 1000
        self._is_ready = is_ready
        self._in_flight = 0
        self._idle: asyncio.Event | None = None  # created by drain(), inside the loop
        self._last_activity = float("-inf")
        """When an inference call last finished or was refused (time.monotonic)."""

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no inference call is in progress and callers have gone quiet (at most
        ``timeout_s``); True when no call was left in progress.

        The caller has made ``is_ready`` false first, so new calls are already refused with
        UNAVAILABLE by this servicer while the server still accepts them. Stopping the server cuts
        off calls it has received but not yet handed to a servicer (their callers see CANCELLED), so
        the drain also waits until ``DRAIN_QUIET_S`` have passed since a call last finished or was
        refused: callers that answer a finished call with a new one hear UNAVAILABLE from here.
        """
        deadline = time.monotonic() + timeout_s
        if self._in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                log.warning("%d inference call(s) still in progress after %.1fs of drain", self._in_flight, timeout_s)
                return False
        while True:
            now = time.monotonic()
            quiet_s = now - self._last_activity
            if quiet_s >= DRAIN_QUIET_S or now >= deadline:
                return True
            await asyncio.sleep(min(DRAIN_QUIET_S - quiet_s, deadline - now))

    # -- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):
        async with status_boundary(context):
            endpoint = self._endpoint(request.name, request.version, refused_ok=True)
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
        async with status_boundary(context):
            return await self._infer(request, context)

    async def ModelStreamInfer(self, request_iterator, context):
        """One response per request, in completion order; errors travel as ``error_message``."""
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT)

        async def answer(request) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _code, message = to_status(exc)
                response = pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )
            finally:
                slots.release()
            await responses.put(response)

        async def read() -> None:
            async for request in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                response = await responses.get()
                if response is None:
                    break
                yield response
            await reader
        finally:
            for task in (reader, *tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """One inference request (unary, or one of a stream), counted for the drain."""
        if not self._is_ready():
            self._last_activity = time.monotonic()
            raise Unavailable("the gateway is not serving (shutting down or starting); try another replica")
        self._in_flight += 1
        try:
            return await self._infer_admitted(request, context)
        finally:
            self._in_flight -= 1
            self._last_activity = time.monotonic()
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def _infer_admitted(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        metadata = invocation_metadata(context)
        with self._tracing.server_span("infergate/ModelInfer", metadata, {"infergate.model": request.model_name}) as span:
            try:
                endpoint = self._endpoint(request.model_name, request.model_version)
                decoded = decode_infer_request(request, endpoint.signature, endpoint.max_batch_size)
                ctx = call_context(context, decoded.parameters, self._default_deadline_s, metadata=metadata)
                result = await self._pipeline.infer(endpoint, decoded.inputs, decoded.outputs, ctx, decoded.rows)
            except GatewayError as exc:
                mark_error(span, exc.code.name, exc.message)
                raise
            if span.is_recording():
                span.set_attribute("infergate.variant", result.variant)
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

    def _endpoint(self, model: str, version: str = "", refused_ok: bool = False) -> ModelEndpoint:
        # Checked before the lookup: without `infer:*` an unknown model looks forbidden, so names
        # cannot be probed. This also covers an `x-infergate-variant` pin, which needs `infer:<model>`.
        if not current_identity.get().may_infer(model):
            raise PermissionDenied(f"not allowed to use model {model!r}")
        endpoint = self._pipeline.endpoint(model)
        if version not in ("", "1"):
            raise NotFound(f"model {model!r} has no version {version!r}; the gateway serves version 1")
        if endpoint.refusal and not refused_ok:  # no signature to validate against, nothing to serve
            raise Unavailable(f"model {model!r} is not loaded: {endpoint.refusal}")
        return endpoint

    async def _any_variant_ready(self, endpoint: ModelEndpoint) -> bool:
        try:
            return any(
                await asyncio.gather(*(v.backend.ready(v.target) for v in endpoint.variants.values()))
            )
        except Exception as exc:
            raise Internal("readiness check failed") from exc

"""Request decoding at the gRPC edge: a message that does not parse is INVALID_ARGUMENT, on every RPC.

grpc.aio decodes a request with the handler's ``request_deserializer`` before any servicer or
interceptor code can see the call's context; when that raises (``DecodeError`` on truncated
bytes, a wrong wire type, invalid UTF-8 in a string field, nesting too deep) grpc answers
UNKNOWN "Unexpected <class ...>", and a streamed request's error surfaces inside the servicer's
iteration. ``DecodingRegistry`` stands between the generated ``add_*_to_server`` functions and the
server: every method handler registered through it receives the raw bytes and decodes them in a
wrapper that owns the call's context, so a bad message ends the call with INVALID_ARGUMENT and a
short fixed message (never the bytes, never a traceback). It wraps once, at registration; a call
pays one extra frame. The same seam runs the auth check (``AuthInterceptor.check``) before
anything else, and admits unary requests against the in-flight memory budget
(``gateway/admission.py``) before they are decoded.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc

from infergate.gateway.admission import MemoryBudget
from infergate.gateway.errors import InvalidArgument, ResourceExhausted
from infergate.gateway.identity import current_identity

Deserializer = Callable[[bytes], Any]


class Guard(Protocol):
    """The auth check of ``gateway/auth/interceptor.py``: which methods need it, and the check itself
    (None when admitted; else a refusal with ``refuse_unary`` and ``refuse_stream``)."""

    def guards(self, method: str) -> bool: ...

    async def check(self, method: str, metadata) -> Any: ...


class MalformedMessage(InvalidArgument):
    """A streamed request message that does not parse."""


Refused = Callable[[str, str, Any], None]
"""``refused(method, status name, identity)``: a call ended at this edge, for the count and the access log."""


async def admit_or_abort(
    budget: MemoryBudget | None, raw: bytes, context: grpc.aio.ServicerContext, refused: Refused | None = None, method: str = ""
) -> int:
    """Reserve ``len(raw)`` of ``budget`` for the call; over it, end the call RESOURCE_EXHAUSTED."""
    if budget is None:
        return 0
    try:
        budget.reserve(len(raw))
    except ResourceExhausted as exc:
        if refused is not None:
            refused(method, exc.code.name, current_identity.get())
        await context.abort(exc.code, exc.message)
    return len(raw)


async def decode_or_abort(
    deserialize: Deserializer, raw: bytes, context: grpc.aio.ServicerContext, what: str,
    refused: Refused | None = None, method: str = "",
) -> Any:
    """``deserialize(raw)``; a message that does not parse aborts the call with INVALID_ARGUMENT."""
    try:
        return deserialize(raw)
    except Exception:  # DecodeError, RecursionError, ...: any failure to parse is the caller's bad input
        if refused is not None:
            refused(method, "INVALID_ARGUMENT", current_identity.get())
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {what} message")


def _message_name(deserialize: Deserializer) -> str:
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


def strict_handler(
    handler: grpc.RpcMethodHandler | None,
    budget: MemoryBudget | None = None,
    guard: Guard | None = None,
    method: str = "",
    refused: Refused | None = None,
) -> grpc.RpcMethodHandler | None:
    """``handler`` with its request decoding moved inside the call (see the module docstring); a
    unary request also holds its size of ``budget`` until the call ends (streams: the servicer).
    With a ``guard`` that guards ``method``, a call is checked first and a refused one never
    reaches the budget, the decoder or the servicer. ``refused`` hears of unary calls ended here
    (over the budget, a message that does not parse)."""
    if handler is None or handler.request_deserializer is None:
        return handler
    if guard is not None and not guard.guards(method):
        guard = None
    deserialize = handler.request_deserializer
    what = _message_name(deserialize)
    serialize = handler.response_serializer

    if not handler.request_streaming:
        inner = handler.unary_unary or handler.unary_stream

        async def opened(raw: bytes, context) -> tuple[Any, int]:
            """The auth check, the budget, then the decoding: the request and the bytes of the budget
            it holds (the caller releases them); a refusal ends the call here."""
            if guard is not None:
                refusal = await guard.check(method, context.invocation_metadata())
                if refusal is not None:
                    await refusal.refuse_unary(raw, context)
            reserved = await admit_or_abort(budget, raw, context, refused, method)
            try:
                return await decode_or_abort(deserialize, raw, context, what, refused, method), reserved
            except BaseException:
                if reserved:
                    budget.release(reserved)
                raise

        if handler.response_streaming and inspect.isasyncgenfunction(inner):

            async def unary_stream(raw: bytes, context):
                request, reserved = await opened(raw, context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    if reserved:
                        budget.release(reserved)

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)

        async def unary(raw: bytes, context):
            request, reserved = await opened(raw, context)
            try:
                return await inner(request, context)
            finally:
                if reserved:
                    budget.release(reserved)

        if handler.response_streaming:  # a coroutine that writes with context.write
            return grpc.unary_stream_rpc_method_handler(unary, None, serialize)
        return grpc.unary_unary_rpc_method_handler(unary, None, serialize)

    async def decoded(raw_messages: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        # Raises instead of aborting: the servicer may read its stream from another task while the
        # handler writes, and a status sent from there collides with the write. The handler's own
        # task turns the error into the status (the servicer's status boundary, or the wrapper below).
        async for raw in raw_messages:
            try:
                yield deserialize(raw)
            except Exception as exc:
                raise MalformedMessage(f"malformed {what} message") from exc

    inner = handler.stream_unary or handler.stream_stream

    async def admitted(raw_messages, context) -> None:
        """The auth check of a stream; a refused one is drained (bounded) and ended here."""
        if guard is not None:
            refusal = await guard.check(method, context.invocation_metadata())
            if refusal is not None:
                await refusal.refuse_stream(raw_messages, context)

    if handler.response_streaming and inspect.isasyncgenfunction(inner):

        async def stream_stream(raw_messages, context):
            await admitted(raw_messages, context)
            try:
                async for response in inner(decoded(raw_messages), context):
                    yield response
            except MalformedMessage as exc:
                await context.abort(exc.code, exc.message)

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)

    async def stream(raw_messages, context):
        await admitted(raw_messages, context)
        try:
            return await inner(decoded(raw_messages), context)
        except MalformedMessage as exc:
            await context.abort(exc.code, exc.message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, None, serialize)
    return grpc.stream_unary_rpc_method_handler(stream, None, serialize)


class _StrictGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose answers go through ``strict_handler``, each method's wrapped once."""

    def __init__(
        self, inner: grpc.GenericRpcHandler, budget: MemoryBudget | None, guard: Guard | None, refused: Refused | None
    ) -> None:
        self._inner = inner
        self._budget = budget
        self._guard = guard
        self._refused = refused
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # not ours: not remembered, so unknown names cannot grow the dict
            self._wrapped[method] = strict_handler(handler, self._budget, self._guard, method, self._refused)
        return self._wrapped[method]


class DecodingRegistry:
    """What the generated ``add_*_to_server`` functions need of a server, with strict decoding.

    Pass it where a ``grpc.aio.Server`` is expected for registration only; ports, start and stop
    stay on the server itself.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        budget: MemoryBudget | None = None,
        guard: Guard | None = None,
        refused: Refused | None = None,
    ) -> None:
        self.server = server
        self.budget = budget
        self.guard = guard
        self.refused = refused

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_StrictGenericHandler(h, self.budget, self.guard, self.refused) for h in generic_rpc_handlers)
        )

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(
            service_name,
            {
                name: strict_handler(handler, self.budget, self.guard, f"/{service_name}/{name}", self.refused)
                for name, handler in method_handlers.items()
            },
        )

"""The gateway's one exception tree.

Every error that can reach a caller is a ``GatewayError`` subclass that knows its gRPC status code.
Domain code raises these; backends translate their own failures at the backend edge with
``raise ... from exc`` so the cause is kept for logs; the servicers map them to a status in one
place (``servicer.status_boundary`` with ``to_status``), at most ``MAX_MESSAGE_CHARS`` long. Anything that is not a ``GatewayError`` becomes INTERNAL with a short
message and is logged with its traceback, never sent to the caller.

    GatewayError
    ├── InvalidArgument        INVALID_ARGUMENT   bad dtype, shape, sizes, inputs, parameters
    ├── NotFound               NOT_FOUND          unknown model or variant, missing feature row
    ├── Unauthenticated        UNAUTHENTICATED    no or bad credentials
    ├── PermissionDenied       PERMISSION_DENIED  valid identity without the scope
    ├── ResourceExhausted      RESOURCE_EXHAUSTED over a size, rate or concurrency limit
    ├── Unavailable            UNAVAILABLE        queue full, backend down, Redis down (fail mode)
    │   └── BackendUnavailable                    a backend could not be reached (retryable)
    ├── DeadlineExceeded       DEADLINE_EXCEEDED  the call's deadline passed
    ├── Aborted                ABORTED            stale revision in a compare-and-set
    ├── FailedPrecondition     FAILED_PRECONDITION
    │   └── ArtifactRejected                      a model file's digest is not the configured one
    ├── Unimplemented          UNIMPLEMENTED
    └── Internal               INTERNAL           a bug or a backend's internal failure
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_CHARS = 1024
"""The longest status message a caller is sent. Messages quote caller input (a model name, an
input name, a parameter); gRPC carries the message percent-encoded in a trailer that clients cap
(8 KiB by default), and an oversized trailer turns into a different status. Kept well below."""


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters, with a marker saying so."""
    if len(message) <= limit:
        return message
    marker = f"... ({len(message)} characters, cut)"
    return message[: limit - len(marker)] + marker


class GatewayError(Exception):
    """Base of every error the gateway reports to a caller; ``code`` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = bounded(message)  # the one place every caller-visible message passes
        super().__init__(message)
        self.message = message


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class BackendUnavailable(Unavailable):
    """A backend could not be reached or refused for lack of capacity; safe to retry or fall back."""


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(GatewayError):
    code = grpc.StatusCode.ABORTED


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ArtifactRejected(FailedPrecondition):
    """A model file is not the one the config names (its SHA-256 differs); it is never loaded."""


class Unimplemented(GatewayError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(GatewayError):
    code = grpc.StatusCode.INTERNAL


_GRPC_TO_ERROR: dict[grpc.StatusCode, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Aborted,
        FailedPrecondition,
        Unimplemented,
        Internal,
    )
}


def error_for_status(code: grpc.StatusCode, message: str) -> GatewayError:
    """The domain error for a status received from an upstream gRPC server."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailable(message)
    return _GRPC_TO_ERROR.get(code, Internal)(message)

"""The auth check, the ``Authenticator`` that builds it from ``AuthConfig``, and its interceptor form.

``AuthInterceptor.check`` lets ``grpc.health.v1.Health`` and server reflection through untouched,
reads ``authorization: Bearer <jwt>``, verifies the token (from the verified-token cache when it
can), charges the tenant's token bucket, then sets ``gateway.identity.current_identity``; it
returns None for an admitted call and the refusal (UNAUTHENTICATED, RESOURCE_EXHAUSTED, or INTERNAL
when the verifier itself failed) for a refused one. The gateway runs it first thing in the method
handler wrapper of ``gateway/wire.py``, before the request is decoded, so no servicer code runs for
a refused call; a grpc.aio server interceptor would do the same work at about 50 µs more CPU per
call (measured pinned, BENCHMARKS.md). ``intercept_service`` keeps the interceptor form for servers
assembled by hand.

Why the context variable reaches the handler: grpc.aio runs each call in its own task, and that
task runs the wrapper (or the interceptors) and then the handler in the same context, so a
``ContextVar`` set here is what the handler reads (``tests/gateway/auth/test_interceptor.py`` checks it with concurrent
callers of different identities, unary and streaming). Tasks the handler creates copy it.

A unary request is refused by a unary handler (grpc has read the request before it runs); a
streamed request by a stream handler that first reads what the client sends, undecoded and within
``REJECT_DRAIN_MESSAGES`` and ``REJECT_DRAIN_S`` (see ``_Refusal`` for why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping

import grpc

from infergate.gateway import metrics
from infergate.gateway.auth.keys import JwksFileSource, JwksUrlSource, KeySource, SecretKeySource
from infergate.gateway.auth.ratelimit import TenantRateLimiter
from infergate.gateway.auth.verifier import Reason, TokenRejected, TokenVerifier
from infergate.gateway.config import AuthConfig
from infergate.gateway.identity import Identity, auth_window_ns, current_identity

log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
"""Services callers reach without a token (health and discovery, as Kubernetes probes and grpcurl expect)."""

REJECT_DRAIN_S = 0.5
REJECT_DRAIN_MESSAGES = 64
"""A refused call's messages are read (and dropped) until the client half-closes, within these bounds."""
RATE_LIMITED_MESSAGE = "tenant over its request rate"
INTERNAL_MESSAGE = "authentication failed"

RefusalObserver = Callable[[str, str, Identity | None], None]
"""``(method, status name, identity or None)`` for each refused call (``gateway.logs.RefusedCalls.auth_refused``)."""


def bearer_token(metadata) -> str:
    """The token of the one ``authorization: Bearer <token>`` entry; raises ``TokenRejected``."""
    value = None
    for key, item in metadata or ():
        if key == "authorization":
            if value is not None:
                raise TokenRejected(Reason.MALFORMED_HEADER)
            value = item
    if value is None:
        raise TokenRejected(Reason.MISSING_TOKEN)
    if not isinstance(value, str):
        raise TokenRejected(Reason.MALFORMED_HEADER)
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise TokenRejected(Reason.MALFORMED_HEADER)
    return token


class _Refusal:
    """Pre-built handlers that end a call with one status, one per request shape."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        async def refuse_unary(request, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        async def refuse_stream(request_iterator, context: grpc.aio.ServicerContext) -> None:
            # Take in what the client sends before ending the call (bounded, undecoded): a grpc.aio
            # client that writes after the call ended reports INTERNAL "Internal error from Core"
            # instead of our status (grpc/grpc#36066), which a refused stream would otherwise hit.
            received = 0
            try:
                async with asyncio.timeout(REJECT_DRAIN_S):
                    async for _message in request_iterator:
                        received += 1
                        if received >= REJECT_DRAIN_MESSAGES:
                            break
            except TimeoutError:
                pass
            await context.abort(code, message)

        self.refuse_unary = refuse_unary
        self.refuse_stream = refuse_stream
        """``refuse_stream(raw_messages, context)``: drain what the client sends (bounded), then end the call."""
        # No deserializers: a refused request is never decoded.
        self._unary = grpc.unary_unary_rpc_method_handler(refuse_unary)
        self._stream = grpc.stream_stream_rpc_method_handler(refuse_stream)

    def handler_for(self, method_handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """The refusing handler shaped like ``method_handler``; None (UNIMPLEMENTED) for an unknown method."""
        if method_handler is None:
            return None
        return self._stream if method_handler.request_streaming else self._unary


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call except health and reflection; see the module docstring."""

    def __init__(
        self, verifier: TokenVerifier, limiter: TenantRateLimiter | None = None, on_refused: RefusalObserver | None = None
    ) -> None:
        self._verifier = verifier
        self._limiter = limiter
        self._on_refused = on_refused
        self._refusals = {reason: _Refusal(grpc.StatusCode.UNAUTHENTICATED, reason.value) for reason in Reason}
        self._refused = {reason: metrics.AUTH_REJECTIONS.labels(reason.name.lower()) for reason in Reason}
        self._rate_limited = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, RATE_LIMITED_MESSAGE)
        self._rate_limited_count = metrics.AUTH_REJECTIONS.labels("rate_limited")
        self._failed = _Refusal(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    def guards(self, method: str) -> bool:
        """Whether calls of ``method`` (``/package.Service/Method``) need a token."""
        return method[1 : method.rfind("/")] not in OPEN_SERVICES

    async def check(self, method: str, metadata) -> _Refusal | None:
        """Admit a call of a guarded ``method`` (None: its identity is set for the handler) or say
        how it is refused."""
        started_ns = time.time_ns()
        try:
            token = bearer_token(metadata)
            identity = self._verifier.cached(token) or await self._verifier.verify(token)
        except TokenRejected as exc:
            self._refused[exc.reason].inc()
            log.debug("auth: %s refused: %s", method, exc.reason.name)
            if self._on_refused is not None:
                self._on_refused(method, "UNAUTHENTICATED", None)
            return self._refusals[exc.reason]
        except Exception as exc:  # a bug must not become UNKNOWN, nor leak token details
            log.error("auth: token verification failed unexpectedly (%s) for %s", type(exc).__name__, method)
            if self._on_refused is not None:
                self._on_refused(method, "INTERNAL", None)
            return self._failed
        if self._limiter is not None and not self._limiter.allow(identity.tenant):
            self._rate_limited_count.inc()
            log.debug("auth: %s refused: tenant %s over its rate (subject %s)", method, identity.tenant, identity.subject)
            if self._on_refused is not None:
                self._on_refused(method, "RESOURCE_EXHAUSTED", identity)
            return self._rate_limited
        current_identity.set(identity)
        auth_window_ns.set((started_ns, time.time_ns()))
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if not self.guards(method):
            return await continuation(handler_call_details)
        refusal = await self.check(method, handler_call_details.invocation_metadata)
        if refusal is not None:
            return refusal.handler_for(await continuation(handler_call_details))
        return await continuation(handler_call_details)


def build_key_source(config: AuthConfig, environ: Mapping[str, str] | None = None) -> KeySource:
    allowed = frozenset(config.algorithms)
    if config.hs256_secret_env:
        return SecretKeySource(config.hs256_secret_env, environ)
    if config.jwks_file is not None:
        return JwksFileSource(config.jwks_file, allowed, config.jwks_file_poll_s)
    if config.jwks_url:
        return JwksUrlSource(config.jwks_url, allowed, config.jwks_cache_ttl_s, config.jwks_refresh_cooldown_s)
    raise ValueError("auth: no key source configured")  # AuthConfig's validation prevents this


class Authenticator:
    """Everything auth needs in one gateway: key source, verifier, rate limiter and interceptor.

    Create it anywhere; call ``start`` inside the running loop before serving (it loads the keys
    and starts the key source's background task) and ``close`` on shutdown.
    """

    def __init__(
        self,
        config: AuthConfig,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_refused: RefusalObserver | None = None,
    ) -> None:
        """``on_refused``: told of every call the interceptor refuses (for counting and the access log)."""
        self.config = config
        self.keys = build_key_source(config, os.environ if environ is None else environ)
        self.verifier = TokenVerifier(config, self.keys, clock)
        self.limiter = (
            TenantRateLimiter(config.rate_limit_per_tenant_rps, config.rate_limit_burst, monotonic)
            if config.rate_limit_per_tenant_rps > 0
            else None
        )
        self.interceptor = AuthInterceptor(self.verifier, self.limiter, on_refused)

    async def start(self) -> None:
        """Load the keys; raises ``AuthSetupError`` naming the config key when that cannot work."""
        await self.keys.start()
        log.info(
            "auth: jwt, algorithms %s, issuer %s, audience %s, per-tenant limit %s calls/s (0: off)",
            ",".join(self.config.algorithms),
            self.config.issuer,
            self.config.audience,
            self.config.rate_limit_per_tenant_rps,
        )

    async def close(self) -> None:
        await self.keys.close()

"""One pipelined Redis connection for the feature fetch on the hot path.

Every caller shares one connection: a command is packed by hiredis and queued, and its reply is
matched to the caller by order (Redis answers a connection's commands in the order they came).
A caller that gives up (its timeout, cancellation) leaves its place in the queue; the late reply
is read and dropped, never handed to the next caller. What callers send in one turn of the event
loop leaves in one write, and one timer serves every caller's deadline.

Compared with redis-py's asyncio pool (redis-py 8), a fetch takes no connection out and puts none
back (a lock, connection-count bookkeeping and an event dispatch on each side), pays no per-call
timer, and the fetches of one loop turn share one send. Measured in one process on one pinned
CPU against a local redis-server, 32 callers fetching 64 keys x 16 floats: a whole
``FeatureStore.fetch`` here costs 24 µs of CPU, the same hiredis-packed MGET alone through
redis-py's pool 50 µs (``python -m infergate.benchmarks.feature_store_cpu``); the fetch before
this change, pool and all, cost 66-69 µs. The pool also opened one connection per concurrent command, each
slow to set up, so a burst right after start missed a view's 20 ms timeout.

Everything else (route state, audit, admin, the ``features load`` CLI) keeps using redis-py, where
a call's cost does not matter. Supported URLs: ``redis://``, ``rediss://`` (TLS with the system's
trust store) and ``unix://``, with username, password and database as redis-py reads them.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque

import hiredis
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


class _Waiter:
    __slots__ = ("future", "expected", "replies", "sent", "deadline")

    def __init__(self, future: asyncio.Future, expected: int, sent: float, deadline: float = math.inf) -> None:
        self.future = future
        self.expected = expected
        self.replies: list = []
        self.sent = sent
        self.deadline = deadline


class _Protocol(asyncio.Protocol):
    """Feeds hiredis with what arrives and resolves the waiters in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[_Waiter] = deque()
        self.lost = False
        self._reader = hiredis.Reader()
        self._unsent: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, deadline: float) -> None:
        """Fail the waiter due at ``deadline`` with TimeoutError then, unless answered before. One
        timer serves every waiter: it is set for the nearest deadline and, when it fires, fails what
        is due and is set again for the next; an answer does not touch it."""
        if self._timer is None or deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time() + 1e-6  # the loop runs a timer up to its clock resolution early
        nearest = math.inf
        for waiter in self.waiters:
            if waiter.future.done():
                continue
            if waiter.deadline <= now:
                waiter.future.set_exception(TimeoutError())  # its reply, when it comes, is read and dropped
            elif waiter.deadline < nearest:
                nearest = waiter.deadline
        if nearest < math.inf:
            self.watch(nearest)

    def send(self, packed: bytes) -> None:
        """Queue ``packed``; what callers queue in one turn of the loop leaves in one write (a
        loopback send costs as much kernel time as the rest of a fetch)."""
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unsent.append(packed)

    def _flush(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self.transport is not None and not self.lost:
            self.transport.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"protocol error from Redis: {exc}"))
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            if not waiters:  # a reply nobody asked for: the stream is out of step, drop it
                self._fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                if self.transport is not None:
                    self.transport.abort()
                return
            waiter = waiters[0]
            waiter.replies.append(reply)
            if len(waiter.replies) == waiter.expected:
                waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(waiter.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)


class RedisPipe:
    """A pipelined connection to the Redis at ``url``, opened on first use and after a loss."""

    def __init__(self, url: str, connect_timeout_s: float = 1.0, stuck_after_s: float = 2.0) -> None:
        options = parse_url(url)
        self._path: str | None = options.get("path")
        self._host: str = options.get("host", "localhost")
        self._port: int = int(options.get("port", 6379))
        self._tls = options.get("connection_class") is SSLConnection
        self._setup = self._handshake(options.get("username"), options.get("password"), int(options.get("db", 0) or 0))
        self._connect_timeout_s = connect_timeout_s
        self._stuck_after_s = stuck_after_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task | None = None

    @staticmethod
    def _handshake(username: str | None, password: str | None, db: int) -> list[bytes]:
        commands = []
        if password is not None:
            commands.append(hiredis.pack_command((b"AUTH", username, password) if username else (b"AUTH", password)))
        if db:
            commands.append(hiredis.pack_command((b"SELECT", db)))
        return commands

    async def execute(self, packed: bytes, replies: int = 1, timeout: float | None = None) -> list:
        """Send ``packed`` (one or more commands packed by ``hiredis.pack_command``) and return its
        ``replies`` replies; an error reply comes back as a ``hiredis.ReplyError`` in the list.

        Raises TimeoutError when ``timeout`` seconds pass first, redis.exceptions.ConnectionError
        when Redis cannot be reached or the connection drops.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        protocol = self._protocol
        if protocol is None or protocol.lost or self._stuck(protocol, now):
            async with asyncio.timeout(timeout):
                protocol = await self._connected()
            now = loop.time()
        if timeout is None:
            waiter = _Waiter(loop.create_future(), replies, now)
        else:
            waiter = _Waiter(loop.create_future(), replies, now, now + timeout)
            protocol.watch(waiter.deadline)
        protocol.waiters.append(waiter)
        protocol.send(packed)
        return await waiter.future

    def _stuck(self, protocol: _Protocol, now: float) -> bool:
        """A connection whose oldest unanswered command waited past ``stuck_after_s`` is dropped
        (Redis answers in order, so nothing behind it can come back sooner)."""
        if not protocol.waiters or now - protocol.waiters[0].sent < self._stuck_after_s:
            return False
        protocol.transport.abort()  # type: ignore[union-attr]
        protocol.lost = True
        return True

    async def _connected(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        # Shielded: a caller's own timeout must not cut off the connect that the next callers share.
        return await asyncio.shield(self._connecting)

    def _connect_done(self, task: asyncio.Task) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._protocol = task.result()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                else:
                    context = ssl.create_default_context() if self._tls else None
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port, ssl=context)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc or type(exc).__name__}") from exc
        if self._setup:
            waiter = _Waiter(loop.create_future(), len(self._setup), loop.time())
            protocol.waiters.append(waiter)
            protocol.transport.write(b"".join(self._setup))
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    answers = await waiter.future
            except TimeoutError as exc:
                protocol.transport.abort()
                raise RedisConnectionError("Redis did not answer the connection set-up in time") from exc
            errors = [answer for answer in answers if isinstance(answer, hiredis.ReplyError)]
            if errors:
                protocol.transport.abort()
                raise ResponseError(f"Redis refused the connection set-up: {errors[0]}")
        return protocol

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

"""The pipelined Redis connection of the feature fetch, against a real redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import time

import hiredis
import pytest
import redis

from infergate.gateway.local_redis import LocalRedis, free_port
from infergate.gateway.redis_pipe import RedisPipe


BLOCK_300MS = hiredis.pack_command(("BLPOP", "nothing", "0.3"))
"""A command Redis answers (nil) only after 0.3 s."""


def mget(*keys: str) -> bytes:
    return hiredis.pack_command((b"MGET", *keys))


def seed(url: str, values: dict[str, str]) -> None:
    client = redis.Redis.from_url(url)
    client.mset(values)
    client.close()


def connections_received(client: redis.Redis) -> int:
    return int(client.info("stats")["total_connections_received"])


async def test_concurrent_callers_each_get_their_own_replies(redis_url):
    seed(redis_url, {f"k{i}": f"v{i}" for i in range(200)})
    pipe = RedisPipe(redis_url)
    try:
        answers = await asyncio.gather(*(pipe.execute(mget(f"k{i}", f"k{i + 1}", "absent")) for i in range(199)))
        several = await pipe.execute(mget("k1") + mget("k2") + hiredis.pack_command(("PING",)), replies=3)
    finally:
        await pipe.close()
    assert answers == [[[f"v{i}".encode(), f"v{i + 1}".encode(), None]] for i in range(199)]
    assert several == [[b"v1"], [b"v2"], b"PONG"]


async def test_an_error_reply_is_returned_to_its_caller_and_the_stream_stays_in_step(redis_url):
    seed(redis_url, {"plain": "x"})
    pipe = RedisPipe(redis_url)
    try:
        wrong, right = await asyncio.gather(
            pipe.execute(hiredis.pack_command(("HMGET", "plain", "f"))), pipe.execute(mget("plain"))
        )
    finally:
        await pipe.close()
    assert isinstance(wrong[0], hiredis.ReplyError) and "WRONGTYPE" in str(wrong[0])
    assert right == [[b"x"]]


async def test_a_caller_that_gives_up_leaves_its_late_reply_behind(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.mset({"a": "1", "b": "2"})
    pipe = RedisPipe(redis_url)
    try:
        await pipe.execute(mget("b"))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await pipe.execute(BLOCK_300MS)
        after = await pipe.execute(mget("b"))  # sent behind the abandoned one, answered after it
    finally:
        await pipe.close()
        client.close()
    assert after == [[b"2"]]


async def test_a_dropped_connection_fails_its_callers_and_the_next_call_reconnects(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.set("a", "1")
    pipe = RedisPipe(redis_url)
    try:
        await pipe.execute(mget("a"))
        before = connections_received(client)
        pending = asyncio.ensure_future(pipe.execute(BLOCK_300MS))
        await asyncio.sleep(0.05)
        client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        with pytest.raises(redis.exceptions.ConnectionError):
            await pending
        again = await pipe.execute(mget("a"))
        reconnected = connections_received(client) - before
    finally:
        await pipe.close()
        client.close()
    assert again == [[b"1"]]
    assert reconnected == 1


async def test_a_connection_whose_oldest_command_waits_too_long_is_replaced(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.set("a", "1")
    pipe = RedisPipe(redis_url, stuck_after_s=0.1)
    try:
        await pipe.execute(mget("a"))
        before = connections_received(client)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await pipe.execute(hiredis.pack_command(("BLPOP", "nothing", "5")))
        await asyncio.sleep(0.15)
        started = time.monotonic()
        answer = await pipe.execute(mget("a"))  # on a new connection, not behind the 5 s wait
        waited = time.monotonic() - started
        reconnected = connections_received(client) - before
    finally:
        await pipe.close()
        client.close()
    assert answer == [[b"1"]]
    assert reconnected == 1
    assert waited < 1.0  # generous: the old connection would have answered after about 5 s


async def test_nothing_listening_is_a_connection_error():
    pipe = RedisPipe(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(redis.exceptions.ConnectionError):
        await pipe.execute(mget("a"))
    await pipe.close()


async def test_password_and_database_from_the_url_are_used():
    with LocalRedis() as server:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        admin.config_set("requirepass", "s3cret")
        admin = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret", db=3)
        admin.set("where", "db3")
        admin.close()
        good = RedisPipe(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        bad = RedisPipe(f"redis://:wrong@127.0.0.1:{server.port}/3")
        try:
            answer = await good.execute(mget("where"))
            with pytest.raises(redis.exceptions.ResponseError) as refused:
                await bad.execute(mget("where"))
        finally:
            await good.close()
            await bad.close()
    assert answer == [[b"db3"]]
    assert "set-up" in str(refused.value)


async def test_a_unix_socket_url_is_served(tmp_path):
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(socket_path), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        client = redis.Redis(unix_socket_path=str(socket_path))
        client.set("u", "unix")
        client.close()
        pipe = RedisPipe(f"unix://{socket_path}")
        try:
            answer = await pipe.execute(mget("u"))
        finally:
            await pipe.close()
    finally:
        server.terminate()
        server.wait(10)
    assert answer == [[b"unix"]]


async def test_each_caller_times_out_at_its_own_deadline_and_an_answer_in_time_is_kept(redis_url):
    seed(redis_url, {"a": "1"})
    pipe = RedisPipe(redis_url)
    try:
        await pipe.execute(mget("a"))
        blocked = asyncio.ensure_future(pipe.execute(BLOCK_300MS, timeout=5.0))  # answered (nil) in time
        late = asyncio.ensure_future(pipe.execute(mget("a"), timeout=0.2))
        early = asyncio.ensure_future(pipe.execute(mget("a"), timeout=0.02))  # a nearer deadline set later
        done, _ = await asyncio.wait({late, early}, return_when=asyncio.FIRST_COMPLETED)
        early_first = done == {early} and not late.done()
        with pytest.raises(TimeoutError):
            await late
        with pytest.raises(TimeoutError):
            await early
        nil = await blocked
        after = await pipe.execute(mget("a"), timeout=1.0)
    finally:
        await pipe.close()
    assert early_first
    assert nil == [None]
    assert after == [[b"1"]]

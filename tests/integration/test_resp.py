"""The hot paths' own Redis connection (app/stores/resp.py), against real servers and on both event loops."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis
import uvloop
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.stores.resp import RespPipe, pack, supports
from tests.servers import RedisServer, free_port


@pytest.mark.parametrize(
    "command",
    [("PING",), ("SET", "k", "v", "EX", 10), ("EVALSHA", "0" * 40, 2, "a", "b", b"\x00\xff\r\n", 1.5, "é" * 300)],
)
def test_packs_like_redis_py(command: tuple[str | bytes | int | float, ...]) -> None:
    expected = b"".join(Connection().pack_command(*command))
    assert pack([command]) == expected
    assert pack([command, command]) == expected * 2


def test_supports_tcp_urls_plain_or_tls() -> None:
    """TLS is tested against a TLS-only server in test_resp_tls.py."""
    assert supports("redis://127.0.0.1:6379/0") and supports("redis://:pw@host:1/3")
    assert supports("rediss://host:6380/0?ssl_ca_certs=/etc/ca.pem")
    assert not supports("unix:///run/redis.sock")
    with pytest.raises(ValueError, match="rediss://"):
        RespPipe("unix:///run/redis.sock", 1.0, 1.0)


async def _replies_in_order(url: str, key: str) -> None:
    pipe = RespPipe(url, 1.0, 1.0)
    try:
        replies = await pipe.execute(
            [("SET", key, "1", "EX", 10), ("GET", key), ("EVALSHA", "0" * 40, 0), ("HGET", key, "f"), ("PING",)]
        )
        assert replies[:2] == [b"OK", b"1"]
        assert isinstance(replies[2], NoScriptError) and isinstance(replies[3], ResponseError)
        assert "WRONGTYPE" in str(replies[3]) and replies[4] == b"PONG"
        # Concurrent batches on the one connection get their own replies.
        batches = await asyncio.gather(*(pipe.execute([("ECHO", f"{i}-{j}") for j in range(3)]) for i in range(20)))
        assert batches == [[f"{i}-{j}".encode() for j in range(3)] for i in range(20)]
    finally:
        pipe.close()


async def test_replies_come_back_in_order_with_errors_in_place(redis_url: str, redis_prefix: str) -> None:
    await _replies_in_order(redis_url, f"{redis_prefix}resp-{os.urandom(4).hex()}")


def test_the_same_under_uvloop(redis_url: str, redis_prefix: str) -> None:
    """The service runs on uvloop, whose transports are not asyncio's classes."""
    uvloop.run(_replies_in_order(redis_url, f"{redis_prefix}resp-{os.urandom(4).hex()}"))


async def test_password_and_database_come_from_the_url() -> None:
    server = RedisServer(options=["--requirepass", "s3cret"]).start()
    try:
        pipe = RespPipe(f"redis://:s3cret@127.0.0.1:{server.port}/7", 1.0, 1.0)
        assert await pipe.execute([("SET", "k", "v")]) == [b"OK"]
        pipe.close()
        direct = redis.Redis(port=server.port, password="s3cret", db=7)
        assert direct.get("k") == b"v"
        direct.close()
        wrong = RespPipe(f"redis://:wrong@127.0.0.1:{server.port}/0", 1.0, 1.0)
        with pytest.raises(ResponseError):
            await wrong.execute([("PING",)])
        wrong.close()
    finally:
        server.stop()


async def test_nothing_listening_is_a_connection_error() -> None:
    pipe = RespPipe(f"redis://127.0.0.1:{free_port()}/0", 1.0, 1.0)
    with pytest.raises(RedisConnectionError):
        await pipe.execute([("PING",)])


async def fake_server(
    handler: Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await handler(connections, reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_a_late_answer_fails_the_waiting_and_the_next_call_connects_again() -> None:
    async def first_silent_then_pong(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if number > 1 and line.upper().startswith(b"PING"):
                writer.write(b"+PONG\r\n")
                await writer.drain()

    servers = fake_server(first_silent_then_pong)
    port = await anext(servers)
    pipe = RespPipe(f"redis://127.0.0.1:{port}/0", 0.2, 1.0)
    started = time.monotonic()
    waiting = [pipe.execute([("PING",)]) for _ in range(3)]
    results = await asyncio.gather(*waiting, return_exceptions=True)
    # A late answer is a timeout (the commands may have run), not a connection that could not be made.
    assert all(isinstance(result, RedisTimeoutError) for result in results), results
    assert time.monotonic() - started < 1.0
    assert await pipe.execute([("PING",)]) == [b"PONG"]
    pipe.close()
    await anext(servers, None)


async def test_a_reply_nobody_asked_for_resets_the_connection() -> None:
    async def chatty(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line.upper().startswith(b"PING"):
                writer.write(b"+PONG\r\n" * (2 if number == 1 else 1))
                await writer.drain()

    servers = fake_server(chatty)
    port = await anext(servers)
    pipe = RespPipe(f"redis://127.0.0.1:{port}/0", 1.0, 1.0)
    # The first answer arrives; the surplus one finds nobody waiting and closes the connection.
    assert await pipe.execute([("PING",)]) == [b"PONG"]
    await asyncio.sleep(0.05)
    assert await pipe.execute([("PING",)]) == [b"PONG"]
    pipe.close()
    await anext(servers, None)


async def test_something_that_is_not_resp_fails_the_call() -> None:
    async def babbling(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            writer.write(b"HTTP/1.1 400 Bad Request\r\n")
            await writer.drain()

    servers = fake_server(babbling)
    port = await anext(servers)
    pipe = RespPipe(f"redis://127.0.0.1:{port}/0", 1.0, 1.0)
    with pytest.raises(RedisConnectionError, match="not RESP"):
        await pipe.execute([("PING",)])
    pipe.close()
    await anext(servers, None)

"""One pipelined connection to a Redis node for the hot paths' commands, without a client library's layers.

The scans and credential refreshes of one event-loop turn go to Redis as one write; replies come
back in order and resolve their futures straight from `data_received` (hiredis parses them).
redis-py's pipeline did the same with a pipeline object, a pooled connection, a reader task
and per-command response handling: about 20 µs of client CPU per command against ~5 here, and
one event-loop turn more per batch (docs/performance.md). Everything else — scripts loading,
the event stream, cluster nodes — stays with redis-py.

`rediss://` URLs speak TLS with the query parameters redis-py reads (`ssl_ca_certs`,
`ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs` — required by default —, `ssl_check_hostname`, …),
so one URL configures both clients alike.

Any failure (refused, reset, a reply later than the timeout) closes the connection and fails
every command waiting on it; the next batch connects again. A command that timed out may still
have run: callers treat the failure as "the store is unavailable", never as a decision.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Mapping
from typing import Any, cast

import hiredis
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class NotSent(RedisConnectionError):
    """No connection could be made: nothing was sent, so nothing ran."""


# redis-py's names of the TLS options in a URL's query, and the SSLConnection argument each fills.
_SSL_OPTIONS = {
    "ssl_keyfile": "keyfile",
    "ssl_certfile": "certfile",
    "ssl_password": "password",
    "ssl_cert_reqs": "cert_reqs",
    "ssl_include_verify_flags": "include_verify_flags",
    "ssl_exclude_verify_flags": "exclude_verify_flags",
    "ssl_ca_certs": "ca_certs",
    "ssl_ca_data": "ca_data",
    "ssl_ca_path": "ca_path",
    "ssl_check_hostname": "check_hostname",
    "ssl_min_version": "min_version",
    "ssl_ciphers": "ciphers",
}


def supports(url: str) -> bool:
    """Whether a URL names a TCP Redis node this connection can talk to, plain or TLS (not a socket)."""
    return url.startswith(("redis://", "rediss://"))


def ssl_context(options: Mapping[str, object]) -> ssl.SSLContext:
    """The TLS context redis-py's SSLConnection would make of a `rediss://` URL's options.

    Its defaults, not RedisSSLContext's: the server's certificate is required and its name checked.
    """
    arguments: dict[str, Any] = {"cert_reqs": "required", "check_hostname": True}
    arguments.update({_SSL_OPTIONS[name]: value for name, value in options.items() if name in _SSL_OPTIONS})
    context: ssl.SSLContext = RedisSSLContext(**arguments).get()
    return context


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP arrays of bulk strings for the commands, back to back."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _reply(value: Any) -> Any:
    """A reply as redis-py would give it: errors become its exception classes (returned, not raised)."""
    if isinstance(value, hiredis.ReplyError):
        message = str(value)
        return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)
    return value


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader = hiredis.Reader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                value = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis sent something that is not RESP: {exc}"))
                return
            if value is False:
                return
            if not self.waiting:
                # A reply nobody asked for: the stream is out of step; start again.
                self.fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(_reply(value))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, error: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RespPipe:
    """Commands pipelined on one connection to one Redis node; `execute` gives their replies in order."""

    def __init__(self, url: str, timeout: float, connect_timeout: float) -> None:
        if not supports(url):
            raise ValueError("RespPipe talks to redis:// and rediss:// URLs only")
        options = parse_url(url)
        self._host: str = options.get("host", "localhost")
        self._port: int = int(options.get("port", 6379))
        # Built now, so a missing certificate file stops the service at start, not at the first scan.
        self._ssl = ssl_context(options) if url.startswith("rediss://") else None
        self._setup: list[tuple[Any, ...]] = []
        if options.get("password") is not None:
            username = options.get("username")
            self._setup.append(("AUTH", username, options["password"]) if username else ("AUTH", options["password"]))
        if int(options.get("db", 0)):
            self._setup.append(("SELECT", int(options["db"])))
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            return protocol
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and protocol.transport is not None:
                return protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    if self._ssl is None:
                        _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
                    else:
                        _, protocol = await loop.create_connection(
                            _Protocol, self._host, self._port, ssl=self._ssl, server_hostname=self._host
                        )
                    for reply in await self._send(protocol, self._setup):
                        if isinstance(reply, Exception):
                            protocol.fail(RedisConnectionError(f"Redis refused the connection's set-up: {reply}"))
                            raise reply
            except TimeoutError:
                raise NotSent(f"no connection to Redis at {self._host}:{self._port} in time") from None
            except OSError as exc:
                raise NotSent(f"no connection to Redis at {self._host}:{self._port}: {exc}") from exc
            self._protocol = protocol
            return protocol

    @staticmethod
    async def _send(protocol: _Protocol, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not commands:
            return []
        if protocol.transport is None:
            raise RedisConnectionError("connection to Redis lost")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiting.extend(futures)
        protocol.transport.write(pack(commands))
        # gather, not one await after the other: cut off by the timeout, it cancels every future, so none
        # is failed later with an exception nobody retrieves.
        return list(await asyncio.gather(*futures))

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to commands, in order; error replies as redis-py's exceptions (returned, not raised).

        Raises redis-py's TimeoutError when Redis answers too late (the commands may have run), its
        ConnectionError when the connection breaks, and `NotSent` (a ConnectionError) when no connection
        could be made, so nothing was sent.
        """
        protocol = await self._connected()
        try:
            async with asyncio.timeout(self._timeout):
                return await self._send(protocol, commands)
        except TimeoutError:
            protocol.fail(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))
            raise RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s") from None

    def close(self) -> None:
        """Close the connection (commands waiting on it fail)."""
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("connection closed"))
            self._protocol = None

"""Limits at the HTTP layer: uvicorn's httptools protocol with a header size cap, read timeouts and a connection cap.

Served with `uvicorn --http app.server.http_limits:LimitedHttpToolsProtocol` (`make run`, `make serve`). Without it a
64 MB header held the event loop for seconds (httptools joins a header value's pieces quadratically), slow
clients were never closed and their sockets ran the process out of file descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import httptools
import msgspec
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.http.problems import PROBLEM_BASE

logger = logging.getLogger("ecard.http")

# After a refusal the socket is half-closed and what the client still sends is read and dropped for at most
# this long: closing with unread data makes the kernel send a reset, which can destroy the answer in flight.
LINGER_SECONDS: Final = 1.0
# Descriptors kept free for everything that is not a client connection: database, Redis, logs, uploads.
RESERVED_FILES: Final = 64

HEADER_SIZE: Final = "header_size"
HEADER_TIMEOUT: Final = "header_timeout"
BODY_TIMEOUT: Final = "body_timeout"
CONNECTIONS: Final = "connections"


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one worker allows a client, read from ECARD_HTTP_* (defaults for a transit gate fleet)."""

    # Request line and headers together; a gate sends < 1 KiB, a holder's DPoP proof and token < 3 KiB.
    max_header_bytes: int = 16 * 1024
    # From a request's first byte (or the connection's start) to the end of its headers.
    header_timeout: float = 10.0
    # Longest pause between two pieces of a body (nginx's client_body_timeout means the same).
    body_timeout: float = 30.0
    # An idle keep-alive connection is closed after this; a gate scanning every few seconds keeps its own.
    keep_alive_timeout: float = 10.0
    # Open connections (and requests in flight) per worker; the next request is answered 503. At ~0.3 ms per
    # scan, 1,000 queued requests already take the whole 300 ms a gate has: a fast 503 serves it better.
    max_connections: int = 1000

    @classmethod
    def from_env(cls) -> HttpLimits:
        """The limits from the ECARD_HTTP_* variables (README: Limits at the HTTP layer)."""
        defaults = cls()
        return cls(
            max_header_bytes=int(_env_number("ECARD_HTTP_MAX_HEADER_BYTES", defaults.max_header_bytes)),
            header_timeout=_env_number("ECARD_HTTP_HEADER_TIMEOUT", defaults.header_timeout),
            body_timeout=_env_number("ECARD_HTTP_BODY_TIMEOUT", defaults.body_timeout),
            keep_alive_timeout=_env_number("ECARD_HTTP_KEEP_ALIVE_TIMEOUT", defaults.keep_alive_timeout),
            max_connections=int(_env_number("ECARD_HTTP_MAX_CONNECTIONS", defaults.max_connections)),
        )


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one: (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    return soft, target, hard


class LimitTripLog:
    """One WARNING line per limit per second at most; the trips in between are counted on a summary line."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def trip(self, limit: str, peer: str) -> None:
        """Record that `limit` tripped for the client at `peer` (its address only: nothing it sent)."""
        now = time.monotonic()
        last = self._last.get(limit)
        if last is not None and now - last < self.interval:
            if self._suppressed.get(limit, 0) == 0:
                asyncio.get_running_loop().call_later(last + self.interval - now, self._flush, limit)
            self._suppressed[limit] = self._suppressed.get(limit, 0) + 1
            return
        self._last[limit] = now
        logger.warning("http limit %s tripped by %s", limit, peer)

    def _flush(self, limit: str) -> None:
        count = self._suppressed.pop(limit, 0)
        if count:
            self._last[limit] = time.monotonic()
            logger.warning("http limit %s tripped in the last second: %d more", limit, count)


class QueryStringFilter(logging.Filter):
    """Cuts the query string from uvicorn's access log line: queries have carried card numbers."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record, with `METHOD /path` instead of `METHOD /path?query`."""
        args = record.args
        # uvicorn logs (client, method, quoted path[?query], http version, status); a '?' inside the
        # path itself is quoted as %3F, so the first '?' starts the query.
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].partition("?")[0], args[3], args[4])
        return True


def _refusal(status: int, code: str, detail: str, *extra_headers: bytes) -> bytes:
    """A complete HTTP/1.1 problem answer that closes the connection."""
    phrase = HTTPStatus(status).phrase
    body = msgspec.json.encode(
        {"type": PROBLEM_BASE + code, "title": phrase, "status": status, "detail": detail, "code": code}
    )
    head = [
        f"HTTP/1.1 {status} {phrase}".encode(),
        b"content-type: application/problem+json",
        b"content-length: %d" % len(body),
        b"connection: close",
        *extra_headers,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_IDLE, _HEADERS, _BODY, _REFUSED = 0, 1, 2, 3


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that counts header bytes before parsing them and times out slow reads."""

    limits: HttpLimits = HttpLimits.from_env()
    trips: LimitTripLog = LimitTripLog()
    _announced: bool = False

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if not LimitedHttpToolsProtocol._announced:
            LimitedHttpToolsProtocol._announce()
        limits = self.limits
        self.timeout_keep_alive = limits.keep_alive_timeout  # type: ignore[assignment]
        self.limit_concurrency = None  # checked here, so the refusal is logged like the other limits
        self._max_connections = limits.max_connections
        self._max_header_bytes = limits.max_header_bytes
        self._state = _IDLE
        self._header_bytes = 0
        self._headers_seen = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_activity = 0.0
        self._peer = ""

    @classmethod
    def _announce(cls) -> None:
        """Log the limits once per worker (the first connection: logging is set up only after the import)."""
        cls._announced = True
        before, soft, hard = OPEN_FILES
        usable = soft - RESERVED_FILES
        if cls.limits.max_connections > usable:
            logger.warning("open files limit %d leaves room for %d connections only", soft, usable)
            cls.limits = HttpLimits(**{**_as_dict(cls.limits), "max_connections": max(usable, 1)})
        logger.info(
            "open files limit %d (was %d, hard %d); per worker: %d connections, headers %d bytes in %.3g s, "
            "body pauses %.3g s, keep-alive %.3g s",
            soft,
            before,
            hard,
            cls.limits.max_connections,
            cls.limits.max_header_bytes,
            cls.limits.header_timeout,
            cls.limits.body_timeout,
            cls.limits.keep_alive_timeout,
        )

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers: a connection that sends nothing is closed too."""
        super().connection_made(transport)
        self._peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the read timers with the connection."""
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count header bytes before httptools sees them; refuse at the limit, without parsing the rest."""
        state = self._state
        if state != _BODY:
            if state == _REFUSED:
                return  # lingering after a refusal: drop what the client still sends
            if len(data) > self._max_header_bytes - self._header_bytes:
                rest = self._feed_up_to_limit(data)
                if rest is None:
                    return
                data = rest
            else:
                self._header_bytes += len(data)
        if not self._feed(data):
            return
        state = self._state
        if state == _IDLE:
            return  # the usual case: the whole request came in this piece
        if state == _HEADERS:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout_expired)
        elif state == _BODY:
            self._body_activity = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timeout_check)

    def _feed_up_to_limit(self, data: bytes) -> bytes | None:
        """Parse no more than the header budget; what is left once headers ended in it, or None (refused)."""
        while self._state != _BODY:
            budget = self._max_header_bytes - self._header_bytes
            if len(data) <= budget:
                self._header_bytes += len(data)
                return data
            seen = self._headers_seen
            if not self._feed(data[:budget]):
                return None
            if self._headers_seen == seen:
                self._refuse(HEADER_SIZE, HEADER_TOO_LARGE)
                return None
            # A request's headers ended inside the slice; the rest belongs to its body or the next request.
            data = data[budget:]
        return data

    def _feed(self, data: bytes) -> bool:
        """uvicorn's parsing of a piece of input; False when the connection is done with."""
        if self.timeout_keep_alive_task is not None:
            self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._state == _REFUSED:
                return False  # a callback stopped the parser after answering
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        return True

    # Parser callbacks

    def on_message_begin(self) -> None:
        """A request starts: its header bytes are counted from here."""
        self._state = _HEADERS
        HttpToolsProtocol.on_message_begin(self)

    def on_headers_complete(self) -> None:
        """Headers done in time: stop their clock; refuse the request when the worker is full."""
        self._state = _BODY
        self._header_bytes = 0
        self._headers_seen += 1
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if (len(self.connections) > self._max_connections or len(self.tasks) >= self._max_connections) and (
            self.cycle is None or self.cycle.response_complete
        ):
            self._refuse(CONNECTIONS, SERVICE_UNAVAILABLE)
            raise _Refused  # stops httptools: nothing more of this connection is parsed
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        """The body is in: no read clock runs while the app answers."""
        self._state = _IDLE
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        HttpToolsProtocol.on_message_complete(self)

    # Timers

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self._state == _REFUSED or self.transport.is_closing():
            return
        # 408 only to a client that started a request; one that sent nothing is closed quietly (as nginx does).
        started = self._state == _HEADERS and (self.cycle is None or self.cycle.response_complete)
        self._refuse(HEADER_TIMEOUT, REQUEST_TIMEOUT if started else None)

    def _body_timeout_check(self) -> None:
        self._body_timer = None
        if self._state != _BODY or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            self._body_activity = now  # the app has not taken what was read: not the client's pause
        remaining = self._body_activity + self.limits.body_timeout - now
        if remaining > 0:
            self._body_timer = self.loop.call_later(remaining, self._body_timeout_check)
            return
        cycle = self.cycle
        answer: bytes | None = None
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app's receive() gets http.disconnect, its answer goes nowhere
            cycle.message_event.set()
            answer = REQUEST_TIMEOUT
        self._refuse(BODY_TIMEOUT, answer)

    def _cancel_timers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _refuse(self, limit: str, answer: bytes | None) -> None:
        """Log the trip, send `answer` (if any), half-close and drop further input until the client goes."""
        self._state = _REFUSED
        self._cancel_timers()
        self._unset_keepalive_if_required()
        self.trips.trip(limit, self._peer)
        transport = self.transport
        if answer is not None:
            transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_SECONDS, transport.close)


class _Refused(Exception):
    """Raised from a parser callback to stop httptools after a refusal was sent."""


def _as_dict(limits: HttpLimits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in HttpLimits.__slots__}


HEADER_TOO_LARGE: Final = _refusal(
    431, "request_header_fields_too_large", "the request line and headers exceed the server's limit"
)
REQUEST_TIMEOUT: Final = _refusal(408, "request_timeout", "the request was not received in time")
SERVICE_UNAVAILABLE: Final = _refusal(
    503, "unavailable", "too many connections to this server; retry shortly", b"retry-after: 1"
)

# At import, which is the worker's start: uvicorn loads the protocol before the app and before serving.
OPEN_FILES: Final = raise_open_files_limit()
logging.getLogger("uvicorn.access").addFilter(QueryStringFilter())

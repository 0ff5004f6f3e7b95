"""Limits at the HTTP layer, against the real service started with `make run`'s own command line.

The server runs on embedded defaults (no Redis, a fresh SQLite file) with short timeouts set through the
environment; each limit is tripped over raw sockets and its outcome counted exactly: the answer, the
closing, the time it took, and the one rate-limited log line per trip.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from app.domain.imports.controllers import MAX_UPLOAD_BYTES
from app.server.http_limits import HttpLimits
from app.settings import PROJECT_ROOT
from tests.servers import free_port

VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
NGINX_CONF = PROJECT_ROOT / "deploy" / "nginx" / "ecard.conf"

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE_TIMEOUT = 3.0
MAX_CONNECTIONS = 30
# In requests the log must never show: a query's card number and a header's value.
CARD_NUMBER = "D12345678"
HEADER_SECRET = "hdr-secret-5f1c"

TRIP_LINE = re.compile(
    r"http limit (header_size|header_timeout|body_timeout|connections) tripped "
    r"(?:by 127\.0\.0\.1:\d+|in the last second: (\d+) more)"
)


def make_recipe(target: str) -> list[list[str]]:
    """The command lines of a Makefile target, with the variables `make run` uses filled in."""
    lines = (PROJECT_ROOT / "Makefile").read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(f"{target}:"))
    commands = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        commands.append(line.strip())
    return [shlex.split(command.replace("$(VENV)/bin/", f"{VENV_BIN}/")) for command in commands]


@dataclass
class Server:
    """The service as `make run` starts it, and its log."""

    port: int
    log_path: Path

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace")

    def trips(self, limit: str, since: int) -> tuple[int, int]:
        """(trips of `limit` logged after offset `since`, the lines they took)."""
        count = lines = 0
        for message in self.warnings(since):
            match = TRIP_LINE.fullmatch(message)
            if match and match.group(1) == limit:
                lines += 1
                count += int(match.group(2) or 1)
        return count, lines

    def records(self, since: int = 0) -> list[dict[str, Any]]:
        """The JSON log lines after offset `since` (a line still being written is left for later)."""
        records = []
        for line in self.log()[since:].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def warnings(self, since: int = 0) -> list[str]:
        """The messages of the warning lines of logger ecard.http after offset `since`."""
        return [
            record["event"]
            for record in self.records(since)
            if record.get("level") == "warning" and record.get("logger") == "ecard.http"
        ]

    def mark(self) -> int:
        """An offset in the log: what is logged from now on comes after it."""
        return len(self.log())

    async def await_trips(self, limit: str, since: int, expected: int) -> int:
        """Wait until `expected` trips of `limit` are logged (a summary comes within a second); the lines."""
        await until(lambda: self.trips(limit, since)[0] >= expected, 3.0)
        await asyncio.sleep(0.2)  # nothing more than expected arrives late
        count, lines = self.trips(limit, since)
        assert count == expected, self.log()[since:]
        return lines


async def until(check: Callable[[], bool], within: float) -> bool:
    """Whether `check` comes true within `within` seconds (polled)."""
    for _ in range(int(within / 0.05)):
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`make run`: `ecard db upgrade`, then its uvicorn command line, on a free port with short limits."""
    directory = tmp_path_factory.mktemp("http-limits")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL" and not key.startswith("ECARD_")}
    env |= {
        "DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'ecard.sqlite3'}",
        "ECARD_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "ECARD_HTTP_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "ECARD_HTTP_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT),
        "ECARD_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    upgrade, serve = make_recipe("run")
    app = ["--app", "app.asgi:create_app"]
    upgrade = [part for each in upgrade for part in (app if each == "$(APP)" else [each])]
    assert upgrade[1:] == [*app, "ecard", "db", "upgrade"] and "--http" in serve
    subprocess.run(upgrade, cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
    serve = [{"$(HOST)": HOST, "$(PORT)": str(port)}.get(each, each) for each in serve]
    log_path = directory / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(serve, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    try:
        while b"Application startup complete" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)
        yield Server(port, log_path)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case names), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str = "/health") -> tuple[int, float]:
    """GET on a new connection: status and seconds to the answer."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nX-Marker: {HEADER_SECRET}\r\n\r\n".encode())
        status, _headers, _body = await asyncio.wait_for(read_response(reader), 2.0)
        return status, time.perf_counter() - start
    finally:
        writer.close()


async def answer_then_eof(reader: asyncio.StreamReader, within: float) -> tuple[int, dict[str, str], bytes]:
    """The one response a refused connection gets, checking that the server then closes it."""
    status, headers, body = await asyncio.wait_for(read_response(reader), within)
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 2.0) == b""
    return status, headers, body


async def answers_again(server: Server) -> None:
    """/health answers 200 within two seconds (once the server has seen the closed connections go)."""
    statuses: list[int] = []

    async def healthy() -> bool:
        statuses.append((await get(server.port))[0])
        return statuses[-1] == 200

    for _ in range(40):
        if await healthy():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no 200 after the connections closed: {statuses}")


def problem_code(body: bytes) -> str:
    """The stable code of an RFC 9457 problem body."""
    problem = msgspec.json.decode(body)
    code: str = problem["code"]
    assert problem["type"].endswith(code)
    return code


async def test_a_64_mb_header_is_refused_at_once_while_other_requests_keep_their_pace(server: Server) -> None:
    """The service stops reading at 16 KiB: 431 in well under a second, /health answers within 100 ms all along."""
    since = server.mark()
    answered: list[float] = []
    sent: list[int] = []

    def send_64_mb() -> bytes:
        with socket.create_connection((HOST, server.port)) as sock:
            start = time.perf_counter()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Filler: ")
            received = bytearray()

            def read() -> None:
                while chunk := sock.recv(65536):
                    received.extend(chunk)
                    if not answered:
                        answered.append(time.perf_counter() - start)

            reader = threading.Thread(target=read)
            reader.start()
            chunk, total = b"a" * (256 * 1024), 0
            try:
                while total < 64 * 1024 * 1024:
                    sock.sendall(chunk)
                    total += len(chunk)
            except OSError:
                pass  # closed by the server once its linger after the answer is over
            sent.append(total)
            reader.join(5)
            return bytes(received)

    blast = asyncio.create_task(asyncio.to_thread(send_64_mb))
    latencies = []
    while not blast.done() or len(latencies) < 10:
        status, seconds = await get(server.port)
        assert status == 200
        latencies.append(seconds)
        await asyncio.sleep(0.01)
    received = await blast

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert problem_code(body) == "request_header_fields_too_large"
    assert answered[0] < 0.5, answered
    assert sent[0] > 1024 * 1024  # the client did send megabytes, which the server dropped unparsed
    assert max(latencies) < 0.1, latencies
    assert await server.await_trips("header_size", since, 1) == 1


async def test_slow_clients_are_all_closed_after_the_header_timeout(server: Server) -> None:
    """30 half-sent request lines and 5 header drips: each gets 408 and EOF one header timeout after connecting."""
    since = server.mark()

    async def slow_client(drip: bool) -> tuple[int, str, float]:
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(f"GET /health?card_number={CARD_NUMBER} HT".encode())
        dripping = None
        if drip:  # a byte every 0.2 s: never idle for long, yet the headers never end

            async def drip_headers() -> None:
                writer.write(b"TP/1.1\r\nX-Marker: ")
                while True:
                    await asyncio.sleep(0.2)
                    writer.write(HEADER_SECRET[:1].encode())

            dripping = asyncio.create_task(drip_headers())
        try:
            status, _headers, body = await answer_then_eof(reader, HEADER_TIMEOUT + 3)
            return status, problem_code(body), time.perf_counter() - start
        finally:
            if dripping is not None:
                dripping.cancel()
            writer.close()

    results = await asyncio.gather(*(slow_client(drip=index >= 30) for index in range(35)))
    assert [(status, code) for status, code, _ in results] == [(408, "request_timeout")] * 35
    assert all(HEADER_TIMEOUT * 0.9 <= seconds < HEADER_TIMEOUT + 1.5 for _, _, seconds in results), results
    await answers_again(server)  # all 35 closed, none left holding a slot
    assert await server.await_trips("header_timeout", since, 35) <= 2  # a flood of trips is one line and a summary


async def test_a_stalled_body_gets_408_and_a_slow_steady_one_does_not(server: Server) -> None:
    """Body timeout: a body that stops for longer than it is refused; one that keeps coming is answered."""
    since = server.mark()
    body = b'{"card_number":"D00000000","activation_code":"0000-0000","device_public_key":"x"}'
    head = (
        f"POST /v1/holder/activation HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()

    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(head + body[:20])
    start = time.perf_counter()
    status, _headers, answer = await answer_then_eof(reader, BODY_TIMEOUT + 3)
    elapsed = time.perf_counter() - start
    writer.close()
    assert (status, problem_code(answer)) == (408, "request_timeout")
    assert BODY_TIMEOUT * 0.9 <= elapsed < BODY_TIMEOUT + 1.5, elapsed

    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(head)
    start = time.perf_counter()
    for offset in range(0, len(body), 10):  # 9 pieces 0.3 s apart: 2.4 s in all, longer than the timeout
        writer.write(body[offset : offset + 10])
        await asyncio.sleep(0.3)
    status, _headers, answer = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert time.perf_counter() - start > 2 * BODY_TIMEOUT
    assert 400 <= status < 500 and status != 408 and problem_code(answer) != "request_timeout"

    assert await server.await_trips("body_timeout", since, 1) == 1
    log = server.log()[since:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log


async def test_over_the_connection_limit_requests_get_503_until_connections_close(server: Server) -> None:
    """30 kept-alive connections fill the worker: 10 more requests get 503; once the 30 close, 200 again."""
    since = server.mark()
    held = []
    for _ in range(MAX_CONNECTIONS):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers.get("connection") != "close"
        held.append(writer)

    async def over_the_limit() -> tuple[int, str, str]:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        try:
            status, headers, body = await answer_then_eof(reader, 2)
            return status, headers["retry-after"], problem_code(body)
        finally:
            writer.close()

    refused = await asyncio.gather(*(over_the_limit() for _ in range(10)))
    assert refused == [(503, "1", "unavailable")] * 10
    # Counted while the 30 are still held: a probe of answers_again() may meet the limit too (the
    # server has not seen every close yet), and that would be an eleventh trip.
    assert await server.await_trips("connections", since, 10) <= 2

    for writer in held:
        writer.close()
    await answers_again(server)


async def test_the_access_log_has_no_query_string(server: Server) -> None:
    """The access line gives method, route template and status; never the query, which carried card numbers."""
    since = server.mark()
    assert (await get(server.port, f"/health?card_number={CARD_NUMBER}"))[0] == 200

    def logged() -> bool:
        return any(
            (record.get("logger"), record.get("method"), record.get("route"), record.get("status"))
            == ("ecard.access", "GET", "/health", 200)
            for record in server.records(since)
        )

    assert await until(logged, 2.0), server.log()[since:]
    assert CARD_NUMBER not in server.log() and "card_number" not in server.log()


async def test_the_log_says_which_limit_tripped_and_nothing_the_client_sent(server: Server) -> None:
    """Every ecard.http warning is a trip line (limit name and peer address, or a count); no query, no header."""
    since = server.mark()
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(f"GET /health?card_number={CARD_NUMBER} HTTP/1.1\r\nX-Marker: {HEADER_SECRET * 2000}\r\n".encode())
    status, _headers, _body = await answer_then_eof(reader, 2)
    writer.close()
    assert status == 431
    await server.await_trips("header_size", since, 1)
    log = server.log()
    warnings = server.warnings()
    assert warnings and all(TRIP_LINE.fullmatch(message) for message in warnings), warnings
    assert CARD_NUMBER not in log and "card_number" not in log and HEADER_SECRET not in log
    assert "open files limit" in log  # the descriptor limit it raised (or found) and the limits in force


def nginx_directives(text: str) -> dict[str, list[list[str]]]:
    """Every `name arg …;` of an nginx file, by name (comments dropped; values with spaces in quotes)."""
    text = re.sub(r"#[^\n]*", "", text)
    directives: dict[str, list[list[str]]] = {}
    for statement in re.findall(r"([a-z_0-9]+)((?:\s+(?:'[^']*'|\"[^\"]*\"|[^\s;{}'\"]+))*)\s*;", text):
        name, args = statement
        directives.setdefault(name, []).append(re.findall(r"'[^']*'|\"[^\"]*\"|[^\s'\"]+", args))
    return directives


def seconds(value: str) -> float:
    """An nginx time (10s, 1m, 500ms, or bare seconds) in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]


def size(value: str) -> int:
    """An nginx size (8k, 50m, or bare bytes) in bytes."""
    match = re.fullmatch(r"(\d+)([kKmM])?", value)
    assert match, value
    return int(match.group(1)) * {"k": 1024, "m": 1024 * 1024, None: 1}[(match.group(2) or "").lower() or None]


def test_the_proxy_configuration_has_the_services_limits() -> None:
    """deploy/nginx/ecard.conf agrees with the service's defaults and logs no query string."""
    directives = nginx_directives(NGINX_CONF.read_text())
    limits = HttpLimits()

    def one(name: str) -> list[str]:
        [args] = directives[name]
        return args

    [count, buffer] = one("large_client_header_buffers")
    assert int(count) * size(buffer) == limits.max_header_bytes
    assert size(one("client_header_buffer_size")[0]) <= size(buffer)
    assert seconds(one("client_header_timeout")[0]) == limits.header_timeout
    assert seconds(one("client_body_timeout")[0]) == limits.body_timeout
    assert size(one("client_max_body_size")[0]) == MAX_UPLOAD_BYTES
    # Two keepalive_timeouts: the clients' (the service's own) and the pool's to the workers, which is shorter.
    upstream_idle, client_idle = sorted(seconds(args[0]) for args in directives["keepalive_timeout"])
    assert client_idle == limits.keep_alive_timeout and upstream_idle < limits.keep_alive_timeout
    assert int(one("keepalive")[0]) < limits.max_connections
    assert one("proxy_http_version") == ["1.1"] and ["Connection", '""'] in directives["proxy_set_header"]
    assert ["X-Request-Id", "$ecard_request_id"] in directives["proxy_set_header"]
    assert one("limit_conn_status") == ["503"] and len(directives["limit_conn"]) == 2

    [[name, *log_format]] = directives["log_format"]
    [[_path, access_format]] = directives["access_log"]
    assert name == access_format == "ecard"
    line = " ".join(log_format)
    assert "$uri" in line
    assert not re.search(r"\$(request|request_uri|args|query_string|arg_\w+|http_\w+)\b", line), line


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ecard.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_the_proxy_configuration_parses(tmp_path: Path) -> None:
    """`nginx -t` accepts the file in an http block (certificate and log paths pointed into a temporary directory)."""
    cert_path, key_path = _self_signed(tmp_path)
    text = (
        NGINX_CONF.read_text()
        .replace("/etc/ecard/tls/fullchain.pem", str(cert_path))
        .replace("/etc/ecard/tls/privkey.pem", str(key_path))
        .replace("/var/log/nginx/ecard-access.log", str(tmp_path / "access.log"))
    )
    (tmp_path / "ecard.conf").write_text(text)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n    include {tmp_path}/ecard.conf;\n}}\n"
    )
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr

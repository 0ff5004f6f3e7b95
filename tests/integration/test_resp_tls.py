"""The hot paths' own Redis connection over TLS, against a local redis-server on a TLS port only.

The certificates (a CA, the server's, a client's, and an unrelated CA) are made here with
`cryptography`; the server listens on 127.0.0.1 and 127.0.0.2, its certificate names only
127.0.0.1 and localhost, so the other address shows that host names are checked.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from redis.exceptions import ConnectionError as RedisConnectionError

from app.stores.resp import RespPipe
from app.stores.status_mirror import MirroredStatus, RedisStatusMirror, ScanResult, StoreUnavailable
from crypto.credential import NONCE_LENGTH
from tests.integration.test_status_mirror import scan
from tests.servers import RedisServer, free_port

# A refused handshake must fail at once; this bounds "at once" well below a hang.
REFUSAL_DEADLINE = 3.0


@dataclass(frozen=True)
class Pki:
    """PEM files of a throwaway CA, a server and a client certificate, and a CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    *,
    ca: bool = False,
    names: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Make the certificates once for this module."""
    directory = tmp_path_factory.mktemp("tls")
    files = Pki(*(directory / f"{name}.pem" for name in Pki.__dataclass_fields__))
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("eCard test CA", ca_key, None, None, ca=True)
    other = _certificate("someone else's CA", other_key, None, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "redis",
        server_key,
        ca.subject,
        ca_key,
        names=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _certificate("ecard-worker", client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    for path, certificate in ((files.ca, ca), (files.other_ca, other), (files.server_cert, server)):
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key)
    _write_key(files.client_key, client_key)
    return files


def _tls_server(pki: Pki, auth_clients: bool) -> RedisServer:
    """A redis-server listening on a TLS port only (the plain port is 0: closed)."""
    port = free_port()
    return RedisServer(
        port=port,
        options=[
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "127.0.0.2",
            "--tls-cert-file",
            str(pki.server_cert),
            "--tls-key-file",
            str(pki.server_key),
            "--tls-ca-cert-file",
            str(pki.ca),
            "--tls-auth-clients",
            "yes" if auth_clients else "no",
        ],
    ).start()


@pytest.fixture(scope="module")
def tls_redis(pki: Pki) -> Iterator[RedisServer]:
    """A TLS-only server that does not ask clients for a certificate."""
    server = _tls_server(pki, auth_clients=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mutual_tls_redis(pki: Pki) -> Iterator[RedisServer]:
    """A TLS-only server that requires a client certificate signed by its CA."""
    server = _tls_server(pki, auth_clients=True)
    yield server
    server.stop()


def tls_url(server: RedisServer, host: str = "127.0.0.1", **query: str | Path) -> str:
    """A rediss:// URL of server with redis-py's query parameters."""
    return f"rediss://{host}:{server.port}/0?{urlencode({name: str(value) for name, value in query.items()})}"


async def _round_trip(url: str) -> None:
    pipe = RespPipe(url, 1.0, 1.0)
    key = f"tls-{uuid.uuid4().hex}"
    try:
        assert await pipe.execute([("SET", key, "é", "EX", 10), ("GET", key), ("PING",)]) == [
            b"OK",
            "é".encode(),
            b"PONG",
        ]
        batches = await asyncio.gather(*(pipe.execute([("ECHO", f"{i}")]) for i in range(10)))
        assert batches == [[f"{i}".encode()] for i in range(10)]
    finally:
        pipe.close()


async def _refused(url: str) -> None:
    pipe = RespPipe(url, 1.0, 1.0)
    started = time.monotonic()
    try:
        with pytest.raises(RedisConnectionError):
            await pipe.execute([("PING",)])
    finally:
        pipe.close()
    assert time.monotonic() - started < REFUSAL_DEADLINE


def test_redis_server_was_built_with_tls(tls_redis: RedisServer) -> None:
    assert tls_redis.process is not None and tls_redis.process.poll() is None


async def test_commands_round_trip_over_tls(tls_redis: RedisServer, pki: Pki) -> None:
    await _round_trip(tls_url(tls_redis, ssl_ca_certs=pki.ca))
    await _round_trip(tls_url(tls_redis, "localhost", ssl_ca_certs=pki.ca))


def test_the_same_under_uvloop(tls_redis: RedisServer, pki: Pki) -> None:
    """The service runs on uvloop, whose TLS transport is its own."""
    uvloop.run(_round_trip(tls_url(tls_redis, ssl_ca_certs=pki.ca)))


async def test_clear_text_is_refused(tls_redis: RedisServer) -> None:
    """The server has no plain port and its TLS port refuses RESP in clear: the round trips above were TLS."""
    await _refused(f"redis://127.0.0.1:{tls_redis.port}/0")


async def test_a_server_signed_by_another_ca_is_refused(tls_redis: RedisServer, pki: Pki) -> None:
    await _refused(tls_url(tls_redis, ssl_ca_certs=pki.other_ca))


async def test_a_certificate_for_another_name_is_refused_unless_names_are_not_checked(
    tls_redis: RedisServer, pki: Pki
) -> None:
    await _refused(tls_url(tls_redis, "127.0.0.2", ssl_ca_certs=pki.ca))
    await _round_trip(tls_url(tls_redis, "127.0.0.2", ssl_ca_certs=pki.ca, ssl_check_hostname="false"))
    # ssl_cert_reqs=none: encrypted, the server unchecked (redis-py's meaning of the same URL).
    await _round_trip(tls_url(tls_redis, "127.0.0.2", ssl_cert_reqs="none"))
    await _refused(tls_url(tls_redis, "127.0.0.2", ssl_cert_reqs="required"))


async def test_mutual_tls_with_the_client_certificate(mutual_tls_redis: RedisServer, pki: Pki) -> None:
    await _round_trip(
        tls_url(mutual_tls_redis, ssl_ca_certs=pki.ca, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key)
    )


async def test_mutual_tls_without_a_client_certificate_is_refused(mutual_tls_redis: RedisServer, pki: Pki) -> None:
    await _refused(tls_url(mutual_tls_redis, ssl_ca_certs=pki.ca))


def test_a_missing_certificate_file_fails_at_construction(tls_redis: RedisServer, pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        RespPipe(tls_url(tls_redis, ssl_ca_certs=tmp_path / "absent.pem"), 1.0, 1.0)


async def test_the_status_mirror_takes_the_own_connection_for_tls(mutual_tls_redis: RedisServer, pki: Pki) -> None:
    """The hot calls go over RespPipe (not redis-py) with the same URL redis-py uses for the rest."""
    url = tls_url(mutual_tls_redis, ssl_ca_certs=pki.ca, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key)
    prefix = f"tls-{uuid.uuid4().hex[:8]}:"
    mirror = RedisStatusMirror.from_url(url, prefix)
    try:
        assert isinstance(mirror._pipe, RespPipe)
        card = uuid.uuid4().bytes
        await mirror.set_status(card, MirroredStatus.ACTIVE)  # through redis-py, over TLS
        answer = await mirror.scan(scan(card, b"n" * NONCE_LENGTH, "gate"))  # through the own connection
        assert answer.result == ScanResult.ACCEPTED
        again = await mirror.scan(scan(card, b"n" * NONCE_LENGTH, "other-gate"))
        assert again.result == ScanResult.REPLAYED
    finally:
        await mirror.close()

    unknown_ca = RedisStatusMirror.from_url(tls_url(mutual_tls_redis, ssl_ca_certs=pki.other_ca), prefix)
    try:
        with pytest.raises(StoreUnavailable):
            await unknown_ca.scan(scan(uuid.uuid4().bytes, b"m" * NONCE_LENGTH, "gate"))
    finally:
        await unknown_ca.close()

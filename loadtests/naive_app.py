"""The naive reference the verify benchmark compares against (issue 6): what a first version does.

A Litestar POST that decodes the credential, verifies its Ed25519 signature through
`cryptography` (OpenSSL), checks its window and consumes its nonce with one redis-py `SET NX EX`
call per request — no libsodium, no pipelining of concurrent requests, no terminal, status,
rate, event or disclosure. The service must beat it by 1.5 times while doing all of those. Keys come
from the service's JWKS at start-up (`NAIVE_JWKS_URL`); Redis from `REDIS_URL` and
`ECARD_REDIS_PREFIX` (its keys go under `<prefix>naive:`); with `NAIVE_REDIS_CLUSTER=1`, `REDIS_URL`
names a node of a Redis Cluster and the client is redis-py's `RedisCluster` (still one `SET NX EX`
per request, sent to the key's master). Serve it like the service:

    uvicorn --factory loadtests.naive_app:create_app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import httpx
import msgspec
import redis.asyncio as redis
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from litestar import Litestar, get, post

from crypto.cose import sig_structure
from crypto.credential import CredentialRejected, decode_claims, parse_cose
from crypto.jwk import parse_jwks
from crypto.keys import ALG_EDDSA

MAX_TEXT_LENGTH = 512


class NaiveRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The shape of a verify request."""

    credential: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]


class NaiveResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Accepted, or rejected with a reason."""

    result: str
    reason: str | None = None


class _State:
    keys: dict[bytes, Ed25519PublicKey] = {}
    client: redis.Redis | redis.RedisCluster | None = None
    prefix = ""


@asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    async with httpx.AsyncClient(timeout=10) as http:
        keys = parse_jwks((await http.get(os.environ["NAIVE_JWKS_URL"])).json())
    # Ed25519 only, as a first version would: SM2 keys in the JWKS (bench --profile both / national) are skipped.
    _State.keys = {
        kid: Ed25519PublicKey.from_public_bytes(key.public) for kid, key in keys.items() if key.alg == ALG_EDDSA
    }
    url = os.environ["REDIS_URL"]
    cluster = os.environ.get("NAIVE_REDIS_CLUSTER", "").strip().lower() in ("1", "true", "yes", "on")
    if cluster:
        client = redis.RedisCluster.from_url(url)
        # Learn the slot map before serving: commands that arrive together on a client that has not
        # (redis-py 8.1) are routed without it, draw MOVED answers, and every 5th MOVED closes the
        # connections of the others in flight, which retry: a SET NX sent twice answers "replayed".
        await client.initialize()
        _State.client = client
    else:
        _State.client = redis.Redis.from_url(url)
    _State.prefix = os.environ.get("ECARD_REDIS_PREFIX", "ecard:") + "naive:"
    try:
        yield
    finally:
        await _State.client.aclose()


@post("/naive", status_code=200, request_max_body_size=2048)
async def naive_verify(data: NaiveRequest) -> NaiveResponse:
    """Decode, verify with OpenSSL, check the window, SET NX the nonce: one Redis call per request."""
    try:
        protected, payload, signature, kid = parse_cose(data.credential)
        key = _State.keys.get(kid)
        if key is None:
            return NaiveResponse(result="rejected", reason="unknown_key")
        key.verify(signature, sig_structure(protected, payload))
        claims = decode_claims(payload)
    except CredentialRejected as exc:
        return NaiveResponse(result="rejected", reason=exc.reason.value)
    except InvalidSignature:
        return NaiveResponse(result="rejected", reason="bad_signature")
    if not claims.not_before - 5 <= time.time() <= claims.expires_at + 5:
        return NaiveResponse(result="rejected", reason="expired")
    assert _State.client is not None
    first = await _State.client.set(
        f"{_State.prefix}{claims.sealed_ref.hex()}:{claims.nonce.hex()}", "1", nx=True, ex=120
    )
    return NaiveResponse(result="accepted") if first else NaiveResponse(result="rejected", reason="replayed")


@get("/health")
async def health() -> dict[str, str]:
    """Readiness probe for the benchmark."""
    return {"status": "ok"}


def create_app() -> Litestar:
    """The app factory (uvicorn --factory)."""
    return Litestar(route_handlers=[naive_verify, health], openapi_config=None, lifespan=[_lifespan])

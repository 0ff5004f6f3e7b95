"""The credential's exact header and bounded lifetime, through `POST /v1/verify` both ways, and the nonce's TTL.

Every variant is the holder's real credential re-signed with the region's real key, so only the
rule under test can refuse it. Each is sent on the hot path (a plain `X-Api-Key` scan with
`Content-Length`, answered in front of the router) and on the routed path (a request signed
with the terminal's Ed25519 key, which the hot path hands on). The nonce's TTL is read from the
real Redis with PTTL.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import cbor2
import httpx
import pytest
import redis.asyncio as redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.domain.verification.directory import signing_input
from app.server.context import ServiceContext
from app.stores.status_mirror import card_key
from crypto.base45 import b45encode
from crypto.cose import protected_header
from crypto.credential import NONCE_LENGTH, PREFIX, Claims, encode_claims, open_credential, usable_until
from crypto.keys import b64url, public_raw
from tests import factories
from tests.factories import Gate, Holder, bearer

SICHUAN = "510000"


@dataclass
class Terminal:
    """A transit gate with an API key (hot path) and one with a request-signing key (routed path)."""

    plain: Gate
    signing: Gate
    key: Ed25519PrivateKey


Send = Callable[[httpx.AsyncClient, Terminal, str], Awaitable[httpx.Response]]


async def hot(client: httpx.AsyncClient, terminal: Terminal, text: str) -> httpx.Response:
    """A plain scan: X-Api-Key and Content-Length, which the hot path answers itself."""
    response = await client.post("/v1/verify", json={"credential": text}, headers=terminal.plain.headers)
    assert "content-length" in response.request.headers
    return response


async def routed(client: httpx.AsyncClient, terminal: Terminal, text: str) -> httpx.Response:
    """A signed request, which the hot path hands on to the routed handler."""
    body = json.dumps({"credential": text}, separators=(",", ":")).encode()
    stamp = str(int(time.time()))
    headers = {
        "content-type": "application/json",
        "X-Terminal-Id": terminal.signing.terminal_id,
        "X-Signature-Timestamp": stamp,
        "X-Signature": b64url(terminal.key.sign(signing_input("POST", "/v1/verify", stamp, body))),
    }
    return await client.post("/v1/verify", content=body, headers=headers)


PATHS = [pytest.param(hot, id="hot-path"), pytest.param(routed, id="routed-signed")]


@pytest.fixture
async def terminal(client: httpx.AsyncClient, admin_token: str) -> Terminal:
    """Two gates of one transit organisation, with a rate that every variant here fits in."""
    first = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    rate = {"rate_per_minute": 6000, "rate_burst": 200}
    plain = await factories.new_terminal(client, admin_token, first.organisation_id, ["transit"], **rate)
    signing = await factories.new_terminal(client, admin_token, first.organisation_id, ["transit"], **rate)
    key = Ed25519PrivateKey.generate()
    response = await client.put(
        f"/v1/operator/terminals/{signing.terminal_id}/signing-key",
        json={"public_key": b64url(public_raw(key))},
        headers=bearer(admin_token),
    )
    assert response.status_code == 200, response.text
    return Terminal(plain, signing, key)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[redis.Redis]:
    """A client of the real Redis the app uses, to read nonce keys (never to write)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def claims_of(context: ServiceContext, text: str) -> Claims:
    return open_credential(text, context.directory.keys.verify_keys, context.directory.keys.seals).claims


def signed(context: ServiceContext, claims: Claims, protected: bytes | None = None, unprotected: Any = None) -> str:
    """The claims as a credential signed by the region's real key, over whatever header it is given."""
    key = context.directory.keys.signing_keys[claims.region]
    protected = protected_header(key.kid) if protected is None else protected
    payload = encode_claims(claims, context.directory.keys.seals[key.kid])
    signature = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    items = [protected, {} if unprotected is None else unprotected, payload, signature]
    return PREFIX + b45encode(cbor2.dumps(cbor2.CBORTag(18, items)))


def header_variants(kid: bytes) -> dict[str, tuple[bytes, Any]]:
    """(protected header bytes, unprotected header) of every refused kind."""
    exact = protected_header(kid)
    return {
        "crit-unknown-label": (cbor2.dumps({1: -8, 4: kid, 2: [99], 99: 0}), None),
        "crit-known-label": (cbor2.dumps({1: -8, 4: kid, 2: [4]}), None),
        "unknown-label-99": (cbor2.dumps({1: -8, 4: kid, 99: "x"}), None),
        "alg-as-text": (cbor2.dumps({1: "EdDSA", 4: kid}), None),
        "extra-typ": (cbor2.dumps({1: -8, 4: kid, 16: "application/cwt"}), None),
        "x5chain": (cbor2.dumps({1: -8, 4: kid, 33: b"certificate"}), None),
        "duplicate-kid": (b"\xa3\x01\x27\x04\x48" + kid + b"\x04\x48" + kid, None),
        "non-canonical-kid-length": (b"\xa2\x01\x27\x04\x58\x08" + kid, None),
        "kid-in-unprotected": (exact, {4: kid}),
        "unprotected-not-empty": (exact, {99: "note"}),
    }


def nonce_key(context: ServiceContext, claims: Claims) -> str:
    return f"{card_key(context.settings.redis_prefix, claims.card_ref)}:n:{claims.nonce.hex()}"


@pytest.mark.parametrize("send", PATHS)
async def test_every_header_variant_is_malformed_and_burns_nothing(
    client: httpx.AsyncClient,
    context: ServiceContext,
    holder: Holder,
    terminal: Terminal,
    store: redis.Redis,
    send: Send,
) -> None:
    [text] = await factories.credentials(client, holder)
    claims = claims_of(context, text)
    kid = context.directory.keys.signing_keys[claims.region].kid
    assert signed(context, claims) == text  # the construction is the issuer's, header aside
    for name, (protected, unprotected) in header_variants(kid).items():
        response = await send(client, terminal, signed(context, claims, protected, unprotected))
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        assert (body["result"], body["reason"]) == ("rejected", "malformed"), name
        assert "claims" not in body or not body["claims"], name
    # Refused before the store: the same nonce was never consumed, so the real code still works.
    assert await store.exists(nonce_key(context, claims)) == 0
    accepted = (await send(client, terminal, text)).json()
    assert accepted["result"] == "accepted"


@pytest.mark.parametrize("send", PATHS)
async def test_the_lifetime_bound_on_both_paths(
    client: httpx.AsyncClient,
    context: ServiceContext,
    holder: Holder,
    terminal: Terminal,
    store: redis.Redis,
    send: Send,
) -> None:
    [text] = await factories.credentials(client, holder)
    issued = claims_of(context, text)
    settings = context.settings
    bound = settings.credential_lifetime + settings.clock_skew
    now = int(time.time())

    def window(not_before: int, span: int) -> Claims:
        return replace(issued, nonce=os.urandom(NONCE_LENGTH), not_before=not_before, expires_at=not_before + span)

    for claims in (
        window(now - 10, bound + 1),
        window(now, 365 * 86_400),
        window(now - 365 * 86_400, 2 * 365 * 86_400),
    ):
        body = (await send(client, terminal, signed(context, claims))).json()
        assert (body["result"], body["reason"]) == ("rejected", "lifetime_exceeded"), claims
        assert await store.exists(nonce_key(context, claims)) == 0  # no nonce kept for it at all
    edge = window(now - 10, bound)
    assert (await send(client, terminal, signed(context, edge))).json()["result"] == "accepted"


@pytest.mark.parametrize("send", PATHS)
async def test_the_nonce_ttl_is_bounded_by_the_lifetime(
    client: httpx.AsyncClient,
    context: ServiceContext,
    holder: Holder,
    terminal: Terminal,
    store: redis.Redis,
    send: Send,
) -> None:
    settings = context.settings
    lifetime, skew, memory = settings.credential_lifetime, settings.clock_skew, settings.nonce_memory
    [text] = await factories.credentials(client, holder)
    issued = claims_of(context, text)
    assert issued.expires_at - issued.not_before == lifetime

    # An issued code: lifetime + skew + memory, plus the second the scan falls in (TTLs are whole seconds).
    before = int(time.time())
    assert (await send(client, terminal, text)).json()["result"] == "accepted"
    ttl_ms = await store.pttl(nonce_key(context, issued))
    assert 0 < ttl_ms <= (usable_until(issued, skew, lifetime) - before + 1 + memory) * 1000
    assert ttl_ms <= (lifetime + skew + 1 + memory) * 1000

    # The longest window allowed, shown at its earliest second: the longest any nonce lives.
    now = int(time.time())
    edge = replace(
        issued, nonce=os.urandom(NONCE_LENGTH), not_before=now + skew, expires_at=now + skew + lifetime + skew
    )
    before = int(time.time())
    assert (await send(client, terminal, signed(context, edge))).json()["result"] == "accepted"
    ttl_ms = await store.pttl(nonce_key(context, edge))
    assert 0 < ttl_ms <= (usable_until(edge, skew, lifetime) - before + 1 + memory) * 1000
    assert ttl_ms <= (lifetime + 3 * skew + 1 + memory) * 1000
    # A copy shown at the other gate is still caught by the remembered nonce.
    other = routed if send is hot else hot
    assert (await other(client, terminal, signed(context, edge))).json()["reason"] == "replayed"

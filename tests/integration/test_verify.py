"""`POST /v1/verify`: every reason code, single use under a race, and failing closed without Redis."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from litestar import Litestar

from app.asgi import create_app
from app.domain.cards.services import mirror_all_statuses
from app.domain.operators.services import Role
from app.server.context import STATE_KEY, ServiceContext
from crypto.base45 import b45decode, b45encode
from crypto.credential import NONCE_LENGTH, PREFIX, Claims, issue_credential, open_credential
from crypto.keys import SigningKey
from tests import factories
from tests.conftest import make_settings, operator_token, serve
from tests.factories import Gate, Holder, bearer
from tests.servers import RedisServer


def claims_of(context: ServiceContext, credential: str) -> Claims:
    """What an issued credential says."""
    return open_credential(credential, context.directory.keys.verify_keys, context.directory.keys.seals).claims


def resign(context: ServiceContext, claims: Claims, **changes: object) -> str:
    """A credential with changed claims, signed with the region's real key."""
    key = context.directory.keys.signing_keys[claims.region]
    return issue_credential(key, replace(claims, nonce=os.urandom(NONCE_LENGTH), **changes))  # type: ignore[arg-type]


async def test_malformed(client: httpx.AsyncClient, gate: Gate) -> None:
    for text in ["hello", PREFIX + "!!!", PREFIX + b45encode(b"\xa0"), "EC1:"]:
        body = await factories.verify(client, gate, text)
        assert (body["result"], body["reason"]) == ("rejected", "malformed"), text
        assert "claims" not in body


async def test_unknown_key(client: httpx.AsyncClient, context: ServiceContext, holder: Holder, gate: Gate) -> None:
    [credential] = await factories.credentials(client, holder)
    forged = issue_credential(SigningKey.generate(), claims_of(context, credential))
    body = await factories.verify(client, gate, forged)
    assert body["reason"] == "unknown_key"


async def test_bad_signature(client: httpx.AsyncClient, holder: Holder, gate: Gate) -> None:
    [credential] = await factories.credentials(client, holder)
    raw = bytearray(b45decode(credential.removeprefix(PREFIX)))
    raw[-1] ^= 0x01
    body = await factories.verify(client, gate, PREFIX + b45encode(bytes(raw)))
    assert body["reason"] == "bad_signature"
    # The untouched credential is still good: a forged copy must not burn it.
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


async def test_expired_and_not_yet_valid(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, gate: Gate
) -> None:
    [credential] = await factories.credentials(client, holder)
    claims = claims_of(context, credential)
    now = int(time.time())
    expired = resign(context, claims, not_before=now - 120, expires_at=now - 60)
    early = resign(context, claims, not_before=now + 120, expires_at=now + 180)
    assert (await factories.verify(client, gate, expired))["reason"] == "expired"
    assert (await factories.verify(client, gate, early))["reason"] == "not_yet_valid"
    # Within the clock-skew allowance (5 s) both ends still count as valid.
    just_expired = resign(context, claims, not_before=now - 62, expires_at=now - 2)
    assert (await factories.verify(client, gate, just_expired))["result"] == "accepted"


async def test_second_credential_of_a_bundle_is_not_yet_valid(
    client: httpx.AsyncClient, holder: Holder, gate: Gate
) -> None:
    credentials = await factories.credentials(client, holder, count=3)
    assert (await factories.verify(client, gate, credentials[0]))["result"] == "accepted"
    # The third window opens 60 s from now, far beyond the 5 s clock-skew allowance.
    assert (await factories.verify(client, gate, credentials[2]))["reason"] == "not_yet_valid"


async def test_purpose_not_allowed(client: httpx.AsyncClient, holder: Holder, gate: Gate) -> None:
    [credential] = await factories.credentials(client, holder, "medical")
    body = await factories.verify(client, gate, credential)
    assert (body["reason"], body["purpose"]) == ("purpose_not_allowed", "medical")


async def test_region_not_accepted_and_same_province_accepted(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    guangzhou = await factories.new_gate(client, admin_token, "440000", "transit", ["transit"])
    [credential] = await factories.credentials(client, holder)
    assert (await factories.verify(client, guangzhou, credential))["reason"] == "region_not_accepted"
    # Refused before the nonce was consumed: a Sichuan gate still accepts it.
    sichuan = await factories.new_gate(client, admin_token, "510000", "transit", ["transit"])
    assert (await factories.verify(client, sichuan, credential))["result"] == "accepted"


async def test_card_suspended_then_resumed(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, gate: Gate
) -> None:
    [first] = await factories.credentials(client, holder)
    [second] = await factories.credentials(client, holder)
    await factories.set_ecard_state(client, admin_token, holder, "suspended")
    assert (await factories.verify(client, gate, first))["reason"] == "card_suspended"
    await factories.set_ecard_state(client, admin_token, holder, "active")
    assert (await factories.verify(client, gate, second))["result"] == "accepted"


async def test_revoked_card_rejected(client: httpx.AsyncClient, admin_token: str, holder: Holder, gate: Gate) -> None:
    [credential] = await factories.credentials(client, holder)
    await factories.set_ecard_state(client, admin_token, holder, "revoked")
    assert (await factories.verify(client, gate, credential))["reason"] == "card_revoked"


async def test_fifty_simultaneous_copies_accept_exactly_one(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, gate: Gate
) -> None:
    """Ten gates each send the same credential five times at once: one gate wins, once.

    The winner's five copies are one verification (its retries get the same answer and id);
    the other 45 are replays.
    """
    gates = [gate] + [
        await factories.new_terminal(client, admin_token, gate.organisation_id, ["transit"]) for _ in range(9)
    ]
    [credential] = await factories.credentials(client, holder)
    responses = await asyncio.gather(
        *(
            client.post("/v1/verify", json={"credential": credential}, headers=each.headers)
            for _ in range(5)
            for each in gates
        )
    )
    assert all(response.status_code == 200 for response in responses)
    results = [response.json() for response in responses]
    accepted = [result for result in results if result["result"] == "accepted"]
    assert len(accepted) == 5
    assert len({result["verification_id"] for result in accepted}) == 1
    assert sorted(result.get("repeated", False) for result in accepted) == [False, True, True, True, True]
    assert sum(result.get("reason") == "replayed" for result in results) == 45
    assert len({result["verification_id"] for result in results}) == 46


async def test_disclosure_by_business_type(client: httpx.AsyncClient, admin_token: str, holder: Holder) -> None:
    hospital = await factories.new_gate(client, admin_token, "510000", "hospital", ["medical"])
    transit = await factories.new_gate(client, admin_token, "510000", "transit", ["general"])
    other_transit = await factories.new_gate(client, admin_token, "510000", "transit", ["general"])
    [medical] = await factories.credentials(client, holder, "medical")
    general = await factories.credentials(client, holder, "general", count=1)
    general += await factories.credentials(client, holder, "general", count=1)
    at_hospital = await factories.verify(client, hospital, medical)
    assert set(at_hospital["claims"]) == {"holder_name", "citizen_id_masked", "insurance_region"}
    assert at_hospital["claims"]["insurance_region"] == "510000"
    assert "*" * 10 in at_hospital["claims"]["citizen_id_masked"]
    at_gate = await factories.verify(client, transit, general[0])
    at_other = await factories.verify(client, other_transit, general[1])
    assert set(at_gate["claims"]) == {"card_pseudonym"}
    # Pseudonyms differ between organisations, so their logs cannot be joined.
    assert at_gate["claims"]["card_pseudonym"] != at_other["claims"]["card_pseudonym"]
    # Nothing personal in a transit gate's answer.
    for body in (at_gate, at_other):
        assert holder.card_number not in str(body) and "张" not in str(body)


async def test_pseudonym_is_stable_within_an_organisation(
    client: httpx.AsyncClient, holder: Holder, gate: Gate
) -> None:
    first = await factories.credentials(client, holder)
    second = await factories.credentials(client, holder)
    one = await factories.verify(client, gate, first[0])
    two = await factories.verify(client, gate, second[0])
    assert one["claims"]["card_pseudonym"] == two["claims"]["card_pseudonym"]


@pytest.mark.parametrize(
    ("headers", "detail_part"),
    [
        ({}, "X-Api-Key"),
        ({"X-Api-Key": "nonsense"}, "X-Api-Key"),
        ({"X-Api-Key": "ecv1." + "0" * 32 + ".x"}, "X-Api-Key"),
    ],
)
async def test_unknown_terminal_is_401_and_consumes_nothing(
    client: httpx.AsyncClient, holder: Holder, gate: Gate, headers: dict[str, str], detail_part: str
) -> None:
    [credential] = await factories.credentials(client, holder)
    response = await client.post("/v1/verify", json={"credential": credential}, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    assert detail_part in response.json()["detail"]
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"not json", 400),
        (b'{"credential": 5}', 400),
        (b"{}", 400),
        (b'{"credential": ""}', 400),
        (b'{"credential": "x", "extra": 1}', 400),
        (b'{"credential": "' + b"A" * 600 + b'"}', 400),
        (b'{"credential": "' + b"A" * 5000 + b'"}', 413),
    ],
)
async def test_bad_bodies_are_precise_problems(
    client: httpx.AsyncClient, gate: Gate, content: bytes, status: int
) -> None:
    response = await client.post(
        "/v1/verify", content=content, headers={**gate.headers, "content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and problem["detail"] and problem["code"]


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A Redis server of this test alone, so it can be stopped."""
    server = RedisServer().start()
    yield server
    server.stop()


async def test_redis_down_is_503_and_never_accepts(
    database_url: str, own_redis: RedisServer, redis_prefix: str
) -> None:
    # A prefix no app used before: the store is new at start-up (its epoch 0), not one that lost its memory.
    prefix = f"{redis_prefix}down-{uuid.uuid4().hex[:6]}:"
    app: Litestar = create_app(make_settings(database_url, own_redis.url, prefix))
    async with serve(app) as client:
        context: ServiceContext = app.state[STATE_KEY]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        await client.post("/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token))
        holder = await factories.activated_holder(client, token, "510000")
        gate = await factories.new_gate(client, token, "510000", "transit", ["transit"])
        credentials = await factories.credentials(client, holder, count=2)

        own_redis.stop()
        response = await client.post("/v1/verify", json={"credential": credentials[0]}, headers=gate.headers)
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers["retry-after"] == "1"
        assert "not accepted" in response.json()["detail"]
        # Alive, but not ready: a load balancer routes around this worker and does not restart it.
        assert (await client.get("/health")).status_code == 200
        not_ready = await client.get("/ready")
        assert (not_ready.status_code, not_ready.json()["missing"]) == (503, ["status_store"])

        # Back, but empty (it keeps nothing on disk): its memory of used codes is gone, so a code that could
        # have been shown before is refused (it may be a replay), and every code of a card it does not know.
        own_redis.start()
        assert (await factories.verify(client, gate, credentials[0]))["reason"] == "refresh_required"
        async with context.sessions() as session:
            assert await mirror_all_statuses(session, context.mirror, context.pii) >= 1
        other_gate = await factories.new_terminal(client, token, gate.organisation_id, ["transit"])
        assert (await factories.verify(client, other_gate, credentials[0]))["reason"] == "refresh_required"
        assert (await factories.verify(client, gate, credentials[1]))["reason"] == "not_yet_valid"
        # A code issued now starts after the store's new epoch (within a second) and is accepted, once.
        [fresh] = await factories.credentials(client, holder)
        await asyncio.sleep(1 - time.time() % 1 + 0.01)
        assert (await factories.verify(client, gate, fresh))["result"] == "accepted"
        assert (await factories.verify(client, other_gate, fresh))["reason"] == "replayed"

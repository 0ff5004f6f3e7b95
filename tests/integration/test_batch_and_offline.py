"""Gates that lose their uplink: offline kits to decide scans alone, and `POST /v1/verify/batch` to upload them later.

The batch answers each queued scan as `/v1/verify` would have at its scan time, finds credentials used
elsewhere first (online, in another gate's upload, or long ago in the event log) and reports them as
double uses; the same upload again gets the same answers. The offline kit (a region's JWKS and signed
IETF Token Status List) lets `crypto.offline` decide a scan with no server: valid, suspended, revoked,
and stale once the list expires.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from sqlalchemy import select

from app.db.clock import as_utc
from app.db.models import VerificationEvent
from app.domain.verification.events import BATCH
from app.domain.verification.offline import OfflineKits
from app.server.context import ServiceContext
from app.settings import PROJECT_ROOT
from app.stores.invalidation import RedisInvalidationBus
from app.stores.status_mirror import card_key
from crypto.credential import NONCE_LENGTH, Claims, decode_claims, issue_credential, open_credential, parse_cose
from crypto.keys import b64url, b64url_decode
from crypto.offline import OfflineKit, OfflineKitError, OfflineReason, verify_offline
from tests import factories
from tests.factories import Gate, Holder, problem

SICHUAN, CHONGQING = "510000", "500000"
LEEWAY = 5


# --- helpers ---------------------------------------------------------------------------------


def claims_of(context: ServiceContext, credential: str) -> Claims:
    """What an issued credential says."""
    return open_credential(credential, context.directory.keys.verify_keys, context.directory.keys.seals).claims


def resign(context: ServiceContext, claims: Claims, **changes: Any) -> str:
    """A credential with changed claims (and a fresh nonce), signed with the region's real key."""
    key = context.directory.keys.signing_keys[claims.region]
    return issue_credential(key, replace(claims, nonce=os.urandom(NONCE_LENGTH), **changes))


def shown_at(context: ServiceContext, credential: str, when: datetime) -> str:
    """A credential of the same card and purpose as the phone showed it at `when`: valid from 10 s before to
    50 s after, with a nonce of its own (an offline gate's queue holds scans minutes old)."""
    second = int(when.timestamp())
    return resign(context, claims_of(context, credential), not_before=second - 10, expires_at=second + 50)


def scan(credential: str, scanned_at: datetime) -> dict[str, str]:
    """One queued scan as the batch endpoint takes it."""
    return {"credential": credential, "scanned_at": scanned_at.isoformat()}


async def upload(client: httpx.AsyncClient, gate: Gate, scans: list[dict[str, str]]) -> dict[str, Any]:
    """POST /v1/verify/batch (asserting 200); the body."""
    response = await client.post("/v1/verify/batch", json={"scans": scans}, headers=gate.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert len(body["results"]) == len(scans)
    return body


def outcome(item: dict[str, Any]) -> str:
    """`accepted`, or the rejection's reason."""
    reason: str = item.get("reason") or item["result"]
    return reason


def moment(text: str) -> datetime:
    """A timestamp of the API (one without an offset read as UTC: see the time zone test in
    test_batch_and_offline.py)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def close_to(text: str | None, expected: datetime, within: float = 1.0) -> bool:
    """Whether an API timestamp is within `within` seconds of expected."""
    return text is not None and abs((moment(text) - expected).total_seconds()) <= within


async def drain(context: ServiceContext) -> None:
    """Drain the shared event stream into the database until it is empty."""
    drainer = context.event_drain(block_ms=0, claim_idle_ms=0)
    while await drainer.run_once():
        pass


async def stored(context: ServiceContext, ids: list[str]) -> dict[str, VerificationEvent]:
    """The stored events with these ids."""
    async with context.sessions() as session:
        rows = await session.scalars(select(VerificationEvent).where(VerificationEvent.id.in_(ids)))
        return {row.id: row for row in rows}


async def events_of(context: ServiceContext, gate: Gate) -> list[str]:
    """Every stored event id of a terminal."""
    async with context.sessions() as session:
        return list(
            await session.scalars(
                select(VerificationEvent.id).where(VerificationEvent.terminal_id == uuid.UUID(gate.terminal_id))
            )
        )


async def fresh_credential(client: httpx.AsyncClient, holder: Holder, purpose: str = "transit") -> str:
    """One credential, valid now."""
    [credential] = await factories.credentials(client, holder, purpose)
    return credential


# --- batch: each scan its own answer ------------------------------------------------------------


async def test_each_scan_gets_its_own_answer_in_order(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    now = datetime.now(UTC)
    transit = await fresh_credential(client, holder)
    medical = await fresh_credential(client, holder, "medical")
    times = [now - timedelta(seconds=seconds) for seconds in (200, 150, 100, 5)]
    scans = [
        scan(shown_at(context, transit, times[0]), times[0]),
        scan("EC1:0", times[1]),
        scan(shown_at(context, medical, times[2]), times[2]),
        scan(transit, times[3]),
    ]
    body = await upload(client, gate, scans)
    results = body["results"]
    assert [outcome(item) for item in results] == ["accepted", "malformed", "purpose_not_allowed", "accepted"]
    assert [item.get("purpose") for item in results] == ["transit", None, "medical", "transit"]
    assert body["double_uses"] == 0
    assert not any(item.get("repeated") for item in results)
    ids = [item["verification_id"] for item in results]
    assert len(set(ids)) == 4
    # A transit gate's pseudonym, as online.
    assert set(results[0]["claims"]) == set(results[3]["claims"]) and results[0]["claims"]

    # The events say batch, with the scan time beside the upload time.
    await drain(context)
    rows = await stored(context, ids)
    for item, sent in zip(results, scans, strict=True):
        row = rows[item["verification_id"]]
        assert (row.result, row.channel) == (outcome(item), BATCH)
        assert row.scanned_at is not None
        assert abs((as_utc(row.scanned_at) - datetime.fromisoformat(sent["scanned_at"])).total_seconds()) < 0.01
        assert row.terminal_id == uuid.UUID(gate.terminal_id)
    # The holder sees the scans, with when the gate made them.
    usage = await client.get("/v1/holder/usage", auth=holder.auth)
    assert {entry["verification_id"] for entry in usage.json()} == {ids[0], ids[2], ids[3]}
    assert all(entry["scanned_at"] for entry in usage.json())


async def test_a_credential_used_online_then_in_another_gates_batch_is_a_double_use(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    online = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    offline = await factories.new_terminal(client, admin_token, online.organisation_id, ["transit"])
    credential, other = await fresh_credential(client, holder), await fresh_credential(client, holder)
    used_at = datetime.now(UTC)
    assert (await factories.verify(client, online, credential))["result"] == "accepted"

    now = datetime.now(UTC)
    body = await upload(client, offline, [scan(other, now - timedelta(seconds=3)), scan(credential, now)])
    good, copy = body["results"]
    assert outcome(good) == "accepted"
    assert (copy["result"], copy["reason"]) == ("rejected", "replayed")
    assert close_to(copy["first_used_at"], used_at)
    assert copy["verification_id"] != good["verification_id"]
    assert body["double_uses"] == 1


async def test_the_same_credential_in_two_gates_batches_is_accepted_once(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate_a = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    gate_b = await factories.new_terminal(client, admin_token, gate_a.organisation_id, ["transit"])
    now = datetime.now(UTC)
    credential = shown_at(context, await fresh_credential(client, holder), now - timedelta(seconds=12))
    first = await upload(client, gate_a, [scan(credential, now - timedelta(seconds=10))])
    second = await upload(client, gate_b, [scan(credential, now - timedelta(seconds=5))])
    assert (outcome(first["results"][0]), first["double_uses"]) == ("accepted", 0)
    assert (outcome(second["results"][0]), second["double_uses"]) == ("replayed", 1)
    assert second["results"][0]["first_used_at"] is not None


async def test_first_used_at_of_a_batch_use_is_its_scan_time_whoever_answers(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate_a = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    gate_b = await factories.new_terminal(client, admin_token, gate_a.organisation_id, ["transit"])
    gate_c = await factories.new_terminal(client, admin_token, gate_a.organisation_id, ["transit"])
    scanned_at = datetime.now(UTC) - timedelta(seconds=30)
    credential = shown_at(context, await fresh_credential(client, holder), scanned_at)
    await upload(client, gate_a, [scan(credential, scanned_at)])

    await drain(context)  # the event log knows the first use: it answers with the scan time
    from_log = (await upload(client, gate_c, [scan(credential, datetime.now(UTC))]))["results"][0]
    assert outcome(from_log) == "replayed"
    assert close_to(from_log["first_used_at"], scanned_at)

    # Before the event is drained, the store answers: it should say the same.
    other_scanned_at = datetime.now(UTC) - timedelta(seconds=30)
    other = shown_at(context, await fresh_credential(client, holder), other_scanned_at)
    await upload(client, gate_a, [scan(other, other_scanned_at)])
    from_store = (await upload(client, gate_b, [scan(other, datetime.now(UTC))]))["results"][0]
    assert outcome(from_store) == "replayed"
    assert close_to(from_store["first_used_at"], other_scanned_at), from_store["first_used_at"]


async def test_uploading_the_same_batch_again_gives_the_same_answers_and_ids(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    now = datetime.now(UTC)
    credential = await fresh_credential(client, holder)
    times = [now - timedelta(minutes=30 - i) for i in range(3)]
    scans = [scan(shown_at(context, credential, when), when) for when in times]
    first = await upload(client, gate, scans)
    again = await upload(client, gate, scans)
    assert [outcome(item) for item in first["results"]] == ["accepted"] * 3
    strip = [{key: value for key, value in item.items() if key != "repeated"} for item in first["results"]]
    assert [{key: value for key, value in item.items() if key != "repeated"} for item in again["results"]] == strip
    assert all(item["repeated"] for item in again["results"])
    assert again["double_uses"] == 0
    # One event per scan, however often the gate uploads it.
    await drain(context)
    assert sorted(await events_of(context, gate)) == sorted(item["verification_id"] for item in first["results"])


async def test_reuploading_a_batch_with_rejected_scans_gives_the_same_ids(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    online = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    gate = await factories.new_terminal(client, admin_token, online.organisation_id, ["transit"])
    used = await fresh_credential(client, holder)
    assert (await factories.verify(client, online, used))["result"] == "accepted"
    now = datetime.now(UTC)
    scans = [
        scan(await fresh_credential(client, holder), now - timedelta(seconds=3)),
        scan(used, now - timedelta(seconds=2)),
        scan("EC1:0", now - timedelta(seconds=1)),
    ]
    first = await upload(client, gate, scans)
    again = await upload(client, gate, scans)
    assert [outcome(item) for item in first["results"]] == ["accepted", "replayed", "malformed"]
    assert [outcome(item) for item in again["results"]] == ["accepted", "replayed", "malformed"]
    await drain(context)
    assert len(await events_of(context, gate)) == 3, "a re-upload recorded new events"
    assert [item["verification_id"] for item in again["results"]] == [
        item["verification_id"] for item in first["results"]
    ]


async def test_scans_are_judged_at_their_scan_time(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    claims = claims_of(context, await fresh_credential(client, holder))
    now = datetime.now(UTC)
    second = int(now.timestamp())
    # Valid from 200 s to 140 s ago: expired at upload, valid when scanned.
    expired_since = resign(context, claims, not_before=second - 200, expires_at=second - 140)
    scanned_late = resign(context, claims, not_before=second - 200, expires_at=second - 140)
    scans = [
        scan(expired_since, now - timedelta(seconds=170)),
        scan(scanned_late, now - timedelta(seconds=100)),  # scanned 40 s after it expired
        scan(await fresh_credential(client, holder), now + timedelta(seconds=60)),  # in the future
        scan(await fresh_credential(client, holder), now - timedelta(hours=24, seconds=60)),  # too old
        scan(await fresh_credential(client, holder), now + timedelta(seconds=2)),  # within the clock skew
    ]
    body = await upload(client, gate, scans)
    assert [outcome(item) for item in body["results"]] == [
        "accepted",
        "expired",
        "scan_time_invalid",
        "scan_time_invalid",
        "accepted",
    ]
    assert body["double_uses"] == 0
    # Online, now, the same credential is simply expired.
    online = await factories.new_terminal(client, admin_token, gate.organisation_id, ["transit"])
    assert (await factories.verify(client, online, expired_since))["reason"] == "expired"


async def test_a_batch_must_be_well_formed_and_authenticated(
    client: httpx.AsyncClient, holder: Holder, admin_token: str
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    credential = await fresh_credential(client, holder)
    now = datetime.now(UTC)
    bad_bodies: list[Any] = [
        {"scans": []},
        {"scans": [scan(credential, now)] * 501},
        {"scans": [{"credential": credential, "scanned_at": now.replace(tzinfo=None).isoformat()}]},
        {"scans": [{"credential": credential}]},
        {"scans": [{"credential": "", "scanned_at": now.isoformat()}]},
        {"scans": [{"credential": credential, "scanned_at": "yesterday"}]},
        {"scans": [scan(credential, now)], "extra": 1},
    ]
    for bad in bad_bodies:
        response = await client.post("/v1/verify/batch", json=bad, headers=gate.headers)
        problem(response, 400)
    good = {"scans": [scan(credential, now)]}
    assert problem(await client.post("/v1/verify/batch", json=good), 401)["code"] == "unauthorized"
    wrong_key = {"X-Api-Key": gate.api_key[:-4] + "AAAA"}
    assert problem(await client.post("/v1/verify/batch", json=good, headers=wrong_key), 401)["code"] == "unauthorized"
    # None of that used the credential.
    assert outcome((await upload(client, gate, good["scans"]))["results"][0]) == "accepted"


async def test_a_forgotten_nonce_is_found_in_the_event_log(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, redis_url: str, redis_prefix: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate_a = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    gate_b = await factories.new_terminal(client, admin_token, gate_a.organisation_id, ["transit"])
    scanned_at = datetime.now(UTC) - timedelta(minutes=40)
    in_batch = shown_at(context, await fresh_credential(client, holder), scanned_at)
    online = await fresh_credential(client, holder)
    used_online_at = datetime.now(UTC)
    first = (await upload(client, gate_a, [scan(in_batch, scanned_at)]))["results"][0]
    assert outcome(first) == "accepted"
    assert (await factories.verify(client, gate_a, online))["result"] == "accepted"
    await drain(context)

    # Long after, the store has forgotten both nonces (their keys expired): only the event log remembers.
    store = redis.Redis.from_url(redis_url)
    try:
        for credential in (in_batch, online):
            claims = claims_of(context, credential)
            key = f"{card_key(redis_prefix, claims.card_ref)}:n:{claims.nonce.hex()}"
            assert await store.delete(key) == 1, key
    finally:
        await store.aclose()

    now = datetime.now(UTC)
    # Another gate queued a copy of each (the batch one 20 s after the first use, when it was still valid).
    body = await upload(client, gate_b, [scan(in_batch, scanned_at + timedelta(seconds=20)), scan(online, now)])
    copy_of_batch, copy_of_online = body["results"]
    assert outcome(copy_of_batch) == outcome(copy_of_online) == "replayed"
    assert close_to(copy_of_batch["first_used_at"], scanned_at)
    assert close_to(copy_of_online["first_used_at"], used_online_at)
    assert body["double_uses"] == 2

    # The gate that used it uploads its scan again: its earlier answer, same id, no new event.
    again = (await upload(client, gate_a, [scan(in_batch, scanned_at)]))["results"][0]
    assert {key: value for key, value in again.items() if key != "repeated"} == {
        key: value for key, value in first.items() if key != "repeated"
    }
    assert again["repeated"] is True
    await drain(context)
    assert len(await events_of(context, gate_a)) == 2


async def test_timestamps_read_from_the_event_log_carry_their_time_zone(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate_a = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    gate_b = await factories.new_terminal(client, admin_token, gate_a.organisation_id, ["transit"])
    scanned_at = datetime.now(UTC) - timedelta(minutes=5)
    credential = shown_at(context, await fresh_credential(client, holder), scanned_at)
    await upload(client, gate_a, [scan(credential, scanned_at)])
    await drain(context)
    usage = await client.get("/v1/holder/usage", auth=holder.auth)
    assert usage.status_code == 200, usage.text
    [entry] = usage.json()
    copy = (await upload(client, gate_b, [scan(credential, scanned_at + timedelta(seconds=20))]))["results"][0]
    for text in (entry["occurred_at"], entry["scanned_at"], copy["first_used_at"]):
        assert datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None, text


async def test_a_double_use_found_in_the_event_log_is_answered_once_per_gate(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, redis_url: str, redis_prefix: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate_a = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    gate_b = await factories.new_terminal(client, admin_token, gate_a.organisation_id, ["transit"])
    credential = await fresh_credential(client, holder)
    assert (await factories.verify(client, gate_a, credential))["result"] == "accepted"
    await drain(context)
    claims = claims_of(context, credential)
    store = redis.Redis.from_url(redis_url)
    try:
        assert await store.delete(f"{card_key(redis_prefix, claims.card_ref)}:n:{claims.nonce.hex()}") == 1
    finally:
        await store.aclose()

    scans = [scan(credential, datetime.now(UTC))]
    first = (await upload(client, gate_b, scans))["results"][0]
    again = (await upload(client, gate_b, scans))["results"][0]
    assert outcome(first) == outcome(again) == "replayed"
    assert again["verification_id"] == first["verification_id"]


# --- offline kits ----------------------------------------------------------------------------------


def kit_of(response: httpx.Response) -> OfflineKit:
    """The kit in a response, checked by crypto.offline."""
    assert response.status_code == 200, response.text
    return OfflineKit.from_json(response.content)


KitFetcher = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
def fresh_kit(client: httpx.AsyncClient, context: ServiceContext, monkeypatch: pytest.MonkeyPatch) -> KitFetcher:
    """A function: GET /v1/offline-kits/{region} with the stored kit made due and the worker's copy emptied
    first (the deployment reuses a signed list for up to 30 s), optionally signing lists good for `lifetime`
    seconds.

    Not a new worker per fetch: stopping a worker right after it started can hang (see
    test_a_cancelled_invalidation_listener_stops).
    """

    async def fetch(region: str = SICHUAN, *, lifetime: int | None = None) -> httpx.Response:
        settings = context.settings
        kits = OfflineKits(settings.status_list_ttl, lifetime or settings.status_list_lifetime)
        monkeypatch.setattr(context, "offline_kits", kits)
        async with context.sessions() as session:
            await kits.mark_due(session, region)
        return await client.get(f"/v1/offline-kits/{region}")

    return fetch


async def test_offline_kit_is_public_cacheable_and_verifies_a_fresh_credential(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, fresh_kit: KitFetcher
) -> None:
    credential = await fresh_credential(client, holder)
    response = await fresh_kit()
    assert response.status_code == 200, response.text
    cache_control = response.headers["cache-control"]
    assert "public" in cache_control and f"max-age={context.settings.status_list_ttl}" in cache_control
    kit = kit_of(response)
    assert kit.region == SICHUAN
    # Every key the region signs with, as published in the JWKS, and nothing of other regions.
    jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
    region_kids = {key["kid"] for key in jwks if key["region"] == SICHUAN}
    assert {key["kid"] for key in response.json()["jwks"]["keys"]} == region_kids
    assert all(key.region == SICHUAN for key in kit.keys.values())
    now = int(time.time())
    assert kit.status_list.issued_at <= now + 1
    assert kit.status_list.expires_at == kit.status_list.issued_at + context.settings.status_list_lifetime
    assert kit.status_list.ttl == context.settings.status_list_ttl

    # The kit names no card: its signed token is a status list without entries.
    assert len(kit.status_list.status_list) == 0
    assert claims_of(context, credential).card_ref.hex() not in response.text

    result = verify_offline(credential, kit, now, LEEWAY)
    assert result.accepted, result
    assert (result.reason, result.stale) == (None, False)
    assert result.claims is not None and result.claims.purpose == "transit"
    # The gate sees the reference only sealed for this code, never the card's.
    assert result.claims.sealed_ref != claims_of(context, credential).card_ref.hex()

    # Asked again within 30 s, the worker serves the list it signed.
    assert (await client.get(f"/v1/offline-kits/{SICHUAN}")).json() == response.json()
    # Another region's kit does not even know the key that signed it.
    other = kit_of(await fresh_kit(CHONGQING))
    assert verify_offline(credential, other, now, LEEWAY).reason is OfflineReason.UNKNOWN_KEY


async def test_a_suspension_holds_offline_once_the_codes_issued_before_it_expire_and_the_upload_finds_the_rest(
    client: httpx.AsyncClient, admin_token: str, fresh_kit: KitFetcher
) -> None:
    """The offline trade-off (README, "Offline gates"): kits name no card, so a code signed before a
    suspension is accepted offline within its own short window; no code is signed after it; online and
    in the gate's upload the server refuses the card."""
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    shown_offline, shown_online = await fresh_credential(client, holder), await fresh_credential(client, holder)
    now = int(time.time())
    await factories.set_ecard_state(client, admin_token, holder, "suspended")

    after = kit_of(await fresh_kit())
    assert verify_offline(shown_offline, after, now, LEEWAY).accepted
    # ... until its window closes: nothing of it is accepted past exp + leeway.
    late = verify_offline(shown_offline, after, expiry_of(shown_offline) + LEEWAY + 1, LEEWAY)
    assert late.reason is OfflineReason.EXPIRED
    # No new code for a suspended card, so nothing longer-lived reaches a gate.
    refused = await client.post("/v1/holder/credentials", json={"purpose": "transit"}, auth=holder.auth)
    assert refused.status_code == 409, refused.text
    # Online, and in the gate's upload, the issuer knows the card: suspended.
    assert (await factories.verify(client, gate, shown_online))["reason"] == "card_suspended"
    body = await upload(client, gate, [scan(shown_offline, datetime.now(UTC))])
    assert [outcome(item) for item in body["results"]] == ["card_suspended"]


def expiry_of(credential: str) -> int:
    """The exp of a code, as anyone reads it (no keys needed for that)."""
    return decode_claims(parse_cose(credential)[1]).expires_at


async def test_a_stale_status_list_is_refused_unless_the_gate_allows_it(
    client: httpx.AsyncClient, holder: Holder, fresh_kit: KitFetcher
) -> None:
    credential = await fresh_credential(client, holder)
    kit = kit_of(await fresh_kit(lifetime=1))
    expires = kit.status_list.expires_at
    assert expires == kit.status_list.issued_at + 1
    later = expires + LEEWAY + 1  # the credential (60 s) is still valid then; the list is not
    fresh = verify_offline(credential, kit, expires, LEEWAY)
    assert fresh.accepted and not fresh.stale

    stale = verify_offline(credential, kit, later, LEEWAY)
    assert (stale.accepted, stale.reason, stale.stale) == (False, OfflineReason.STATUS_STALE, True)
    assert stale.list_expires_at == expires
    allowed = verify_offline(credential, kit, later, LEEWAY, allow_stale=True)
    assert (allowed.accepted, allowed.reason, allowed.stale) == (True, None, True)


def offline_cli(*args: str, stdin: str | None = None) -> tuple[int, dict[str, Any] | None, str]:
    """Run `python -m crypto.offline …`: exit status, the JSON result (if any) and stderr."""
    process = subprocess.run(
        [sys.executable, "-m", "crypto.offline", *args],
        cwd=PROJECT_ROOT, input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return process.returncode, json.loads(process.stdout) if process.stdout.strip() else None, process.stderr


async def test_offline_command_line_exit_codes(
    client: httpx.AsyncClient, admin_token: str, fresh_kit: KitFetcher, tmp_path: Path
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    credential = await fresh_credential(client, holder)
    good = tmp_path / "kit.json"
    good.write_bytes((await fresh_kit(lifetime=1)).content)
    expires = OfflineKit.from_json(good.read_bytes()).status_list.expires_at

    code, result, _ = offline_cli("--kit", str(good), "--now", str(expires), credential)
    assert code == 0 and result is not None
    assert (result["result"], result["reason"], result["stale"]) == ("accepted", None, False)
    assert "status" not in result and "card_ref" not in result["claims"]
    assert result["claims"]["region"] == SICHUAN

    code, result, _ = offline_cli("--kit", str(good), "--now", str(expires), "-", stdin=credential + "\n")
    assert code == 0 and result is not None and result["result"] == "accepted"

    later = str(expires + LEEWAY + 1)
    code, result, _ = offline_cli("--kit", str(good), "--now", later, credential)
    assert code == 1 and result is not None
    assert (result["result"], result["reason"], result["stale"]) == ("rejected", "status_stale", True)
    code, result, _ = offline_cli("--kit", str(good), "--now", later, "--allow-stale", credential)
    assert code == 0 and result is not None
    assert (result["result"], result["stale"]) == ("accepted", True)

    code, result, _ = offline_cli("--kit", str(good), "EC1:0")
    assert code == 1 and result is not None and result["reason"] == "malformed"

    # A kit that does not check out, or is not there: 2, with the reason on stderr.
    document = json.loads(good.read_bytes())
    token = bytearray(b64url_decode(document["status_list"]))
    token[-1] ^= 0x01  # the signature's last byte
    document["status_list"] = b64url(bytes(token))
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(document))
    with pytest.raises(OfflineKitError):
        OfflineKit.from_json(tampered.read_bytes())
    for path in (tampered, tmp_path / "missing.json"):
        code, result, stderr = offline_cli("--kit", str(path), credential)
        assert (code, result) == (2, None)
        assert "cannot use kit" in stderr


async def test_offline_kit_of_an_unknown_or_malformed_region(client: httpx.AsyncClient, admin_token: str) -> None:
    while (unknown := f"{1 + secrets.randbelow(9)}{secrets.randbelow(10**5):05d}") in factories.REGIONS:
        pass
    assert problem(await client.get(f"/v1/offline-kits/{unknown}"), 404)["code"] == "not_found"
    for malformed in ("51000", "5100000", "051000", "abcdef", "51000x"):
        response = await client.get(f"/v1/offline-kits/{malformed}")
        assert response.status_code in (400, 404), (malformed, response.status_code)
        problem(response, response.status_code)


# --- a worker stopped right after it started -------------------------------------------------------


async def test_a_cancelled_invalidation_listener_stops(redis_url: str, redis_prefix: str) -> None:
    """What each worker's lifespan does at shutdown, at every point of the listener's start."""

    async def listener(topic: str) -> None:
        return None

    stuck: list[int] = []
    for turns in range(64):
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1.0)
        task = asyncio.create_task(
            RedisInvalidationBus(client, f"{redis_prefix}probe:{uuid.uuid4().hex}").run(listener)
        )
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done:
            stuck.append(turns)
            for _ in range(10):  # leave nothing running: a second cancellation does get through
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    break
        await client.aclose()
        if stuck:
            break
    assert stuck == [], f"cancelled after {stuck} event-loop turns, the listener kept running"

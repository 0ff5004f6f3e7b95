"""Verifiers for real: disclosure per business type, rate limits, idempotent retries, terminal keys.

What a gate learns from an accepted credential depends on its organisation's business type only
(transit a pseudonym, park an annual pass, library a member id, hospital and HR&SS office the
holder's name and masked citizen ID, anyone else nothing); a hospital never gets an answer
without the holder's profile. Terminals are rate limited exactly at their burst without consuming
the credential they were refused; the same terminal asking again within its retry window gets the
same answer. Operators disable organisations, rotate API keys (with an overlap) and switch
terminals to Ed25519-signed requests.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.asgi import create_app
from app.db.models import Terminal
from app.domain.cards.services import reconcile_status_mirror
from app.domain.verification.directory import signing_input
from app.server.context import STATE_KEY, ServiceContext
from app.stores.status_mirror import RedisStatusMirror, profile_part
from crypto.credential import open_credential
from crypto.keys import b64url, public_raw
from crypto.sm import Sm2SigningKey
from tests import factories
from tests.conftest import make_settings, serve
from tests.factories import Gate, Holder, bearer, problem

SICHUAN, GUANGDONG = "510000", "440000"
HOLDER_NAME = "张三"
MAX_KEY_OVERLAP = 7 * 24 * 3600


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """An activated holder whose citizen ID and name the test knows."""

    holder: Holder
    citizen_id: str
    name: str

    @property
    def masked_citizen_id(self) -> str:
        """First 4 and last 4 characters, asterisks between."""
        return self.citizen_id[:4] + "*" * (len(self.citizen_id) - 8) + self.citizen_id[-4:]


async def known_person(client: httpx.AsyncClient, token: str, region: str = SICHUAN) -> Person:
    """Issue and activate a card of a new person with a known citizen ID and name."""
    citizen_id = factories.citizen_id(region)
    response = await client.post(
        "/v1/operator/cards",
        json={"region": region, "citizen_id": citizen_id, "name": HOLDER_NAME, "card_number": factories.card_number()},
        headers=bearer(token),
    )
    assert response.status_code == 201, response.text
    issued = response.json()
    session = await factories.activate(client, issued["card"]["card_number"], issued["activation_code"])
    holder = Holder(
        card_id=issued["card"]["card_id"],
        ecard_id=issued["card"]["ecard_id"],
        card_number=issued["card"]["card_number"],
        access_token=session["access_token"],
        refresh_token=session["refresh_token"],
    )
    return Person(holder, citizen_id, HOLDER_NAME)


async def credential(client: httpx.AsyncClient, holder: Holder, purpose: str = "transit") -> str:
    """One credential valid now."""
    [text] = await factories.credentials(client, holder, purpose)
    return text


async def credentials_now(client: httpx.AsyncClient, holder: Holder, count: int, purpose: str = "transit") -> list[str]:
    """count credentials all valid now (a bundle's later windows are not yet valid)."""
    return [await credential(client, holder, purpose) for _ in range(count)]


async def scan(client: httpx.AsyncClient, gate: Gate, text: str) -> httpx.Response:
    """POST /v1/verify with the gate's API key; the raw response."""
    return await client.post("/v1/verify", json={"credential": text}, headers=gate.headers)


async def accepted(client: httpx.AsyncClient, gate: Gate, text: str) -> dict[str, Any]:
    """A verification that must be accepted; its body."""
    body = await factories.verify(client, gate, text)
    assert body["result"] == "accepted", body
    return body


async def new_organisation(client: httpx.AsyncClient, token: str, business_type: str, region: str = SICHUAN) -> str:
    """A verifier organisation's id."""
    response = await client.post(
        "/v1/operator/verifier-organisations",
        json={"name": f"org-{secrets.token_hex(3)}", "business_type": business_type, "region": region},
        headers=bearer(token),
    )
    assert response.status_code == 201, response.text
    organisation_id: str = response.json()["id"]
    return organisation_id


async def patch_terminal(client: httpx.AsyncClient, token: str, gate: Gate, **changes: object) -> dict[str, Any]:
    """PATCH /v1/operator/terminals/{id}; the TerminalOut."""
    response = await client.patch(f"/v1/operator/terminals/{gate.terminal_id}", json=changes, headers=bearer(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def rotate(
    client: httpx.AsyncClient, token: str, gate: Gate, overlap_seconds: int | None = None
) -> tuple[Gate, dict[str, Any]]:
    """Rotate the terminal's API key; the gate with its new key, and the TerminalOut."""
    params = {} if overlap_seconds is None else {"overlap_seconds": overlap_seconds}
    response = await client.post(
        f"/v1/operator/terminals/{gate.terminal_id}/api-key", params=params, headers=bearer(token)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["api_key"] != gate.api_key
    return Gate(gate.terminal_id, gate.organisation_id, body["api_key"]), body["terminal"]


async def audit_actions(client: httpx.AsyncClient, token: str, subject_id: str) -> list[dict[str, Any]]:
    """Audit events about subject_id, newest first."""
    response = await client.get("/v1/operator/audit-events", params={"subject_id": subject_id}, headers=bearer(token))
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


def card_ref_of(context: ServiceContext, text: str) -> bytes:
    """The card reference inside a credential."""
    return open_credential(text, context.directory.keys.verify_keys, context.directory.keys.seals).claims.card_ref


async def drop_profile(context: ServiceContext, redis_url: str, card_ref: bytes) -> None:
    """Delete a card's disclosure profile from Redis behind the service's back (as a lossy restart would)."""
    assert isinstance(context.mirror, RedisStatusMirror)
    bucket, field = context.mirror.layout.place(context.settings.redis_prefix, card_ref)
    store = redis.Redis.from_url(redis_url)
    try:
        value = await store.hget(bucket, field)
        assert value is not None and profile_part(value) is not None
        # The card's value keeps its status and version, and loses the sealed profile after them.
        assert await store.hset(bucket, field, value[: value.index(b".")]) == 0
    finally:
        await store.aclose()


def next_year() -> date:
    """A day about a year from now."""
    return date.today() + timedelta(days=365)


def leaks(person: Person, text: str) -> list[str]:
    """Which personal values appear in a response body (raw text and JSON-escaped)."""
    found = []
    for label, value in [
        ("name", person.name),
        ("citizen id", person.citizen_id),
        ("citizen id digits", person.citizen_id[4:-4]),
        ("card number", person.holder.card_number),
        ("card id", person.holder.card_id),
    ]:
        if value in text or json.dumps(value)[1:-1] in text:
            found.append(label)
    return found


# --- disclosure per business type ------------------------------------------------------------

NON_PERSONAL = [
    pytest.param("transit", "transit", {"card_pseudonym"}, id="transit"),
    pytest.param("park", "park", {"annual_pass_until"}, id="park"),
    pytest.param("library", "library", {"member_id"}, id="library"),
    pytest.param("other", "general", set(), id="other"),
]


@pytest.mark.parametrize(("business_type", "purpose", "claims"), NON_PERSONAL)
async def test_claims_without_personal_data(
    client: httpx.AsyncClient, admin_token: str, business_type: str, purpose: str, claims: set[str]
) -> None:
    person = await known_person(client, admin_token)
    gate = await factories.new_gate(client, admin_token, SICHUAN, business_type, [purpose])
    response = await scan(client, gate, await credential(client, person.holder, purpose))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["result"], body["purpose"]) == ("accepted", purpose)
    assert set(body.get("claims") or {}) == claims
    assert leaks(person, response.text) == []
    # The whole answer: nothing beyond the decision and the policy's claims.
    assert set(body) <= {"result", "verification_id", "purpose", "claims"}


async def test_hospital_sees_name_masked_citizen_id_and_insurance_region(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    person = await known_person(client, admin_token)
    hospital = await factories.new_gate(client, admin_token, SICHUAN, "hospital", ["medical"])
    response = await scan(client, hospital, await credential(client, person.holder, "medical"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["result"], body["purpose"]) == ("accepted", "medical")
    assert body["claims"] == {
        "holder_name": HOLDER_NAME,
        "citizen_id_masked": person.masked_citizen_id,
        "insurance_region": SICHUAN,
    }
    assert re.fullmatch(r"\d{4}\*{10}[\dX]{4}", body["claims"]["citizen_id_masked"])
    assert leaks(person, response.text) == ["name"]


async def test_hrss_office_sees_name_masked_citizen_id_and_card_region(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    person = await known_person(client, admin_token)
    office = await factories.new_gate(client, admin_token, "510000", "hrss_office", ["general"])
    response = await scan(client, office, await credential(client, person.holder, "general"))
    assert response.status_code == 200, response.text
    assert response.json()["claims"] == {
        "holder_name": HOLDER_NAME,
        "citizen_id_masked": person.masked_citizen_id,
        "card_region": SICHUAN,
    }
    assert leaks(person, response.text) == ["name"]


@pytest.mark.parametrize(
    ("business_type", "purpose", "claim"),
    [("transit", "transit", "card_pseudonym"), ("library", "library", "member_id")],
)
async def test_pseudonyms_are_stable_within_an_organisation_only(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, business_type: str, purpose: str, claim: str
) -> None:
    first = await factories.new_gate(client, admin_token, SICHUAN, business_type, [purpose])
    same_org = await factories.new_terminal(client, admin_token, first.organisation_id, [purpose])
    other_org = await factories.new_gate(client, admin_token, SICHUAN, business_type, [purpose])
    texts = await credentials_now(client, holder, 3, purpose)
    at_first = (await accepted(client, first, texts[0]))["claims"][claim]
    at_same_org = (await accepted(client, same_org, texts[1]))["claims"][claim]
    at_other_org = (await accepted(client, other_org, texts[2]))["claims"][claim]
    assert at_first == at_same_org
    assert at_first != at_other_org
    if claim == "member_id":
        assert re.fullmatch(r"[A-Z2-7]{16}", at_first)
    # And it is the card's: another card in the same organisation has another one.
    someone_else = await factories.activated_holder(client, admin_token, SICHUAN)
    other_card = (await accepted(client, first, await credential(client, someone_else, purpose)))["claims"][claim]
    assert other_card != at_first


async def grant_pass(
    client: httpx.AsyncClient, token: str, card_id: str, region: str, valid_until: date
) -> httpx.Response:
    """POST a park annual pass; the raw response."""
    return await client.post(
        f"/v1/operator/cards/{card_id}/entitlements",
        json={"kind": "park_annual_pass", "region": region, "valid_until": valid_until.isoformat()},
        headers=bearer(token),
    )


async def pass_seen(client: httpx.AsyncClient, park: Gate, holder: Holder) -> str | None:
    """What a park gate learns about the card's annual pass now."""
    body = await accepted(client, park, await credential(client, holder, "park"))
    assert set(body["claims"]) == {"annual_pass_until"}
    until: str | None = body["claims"]["annual_pass_until"]
    return until


async def test_park_sees_the_annual_pass_of_its_province(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    park = await factories.new_gate(client, admin_token, SICHUAN, "park", ["park"])
    assert await pass_seen(client, park, holder) is None

    # A Guangdong pass does not open Sichuan parks.
    elsewhere = await grant_pass(client, admin_token, holder.card_id, GUANGDONG, next_year())
    assert elsewhere.status_code == 201, elsewhere.text
    assert await pass_seen(client, park, holder) is None

    granted = await grant_pass(client, admin_token, holder.card_id, SICHUAN, next_year())
    assert granted.status_code == 201, granted.text
    assert granted.json()["region"] == SICHUAN
    assert await pass_seen(client, park, holder) == next_year().isoformat()
    # Another card is not affected.
    someone_else = await factories.activated_holder(client, admin_token, SICHUAN)
    assert await pass_seen(client, park, someone_else) is None

    revoked = await client.delete(
        f"/v1/operator/cards/{holder.card_id}/entitlements/{granted.json()['id']}", headers=bearer(admin_token)
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    assert await pass_seen(client, park, holder) is None
    again = await client.delete(
        f"/v1/operator/cards/{holder.card_id}/entitlements/{granted.json()['id']}", headers=bearer(admin_token)
    )
    assert problem(again, 409)["code"] == "conflict"

    listed = await client.get(f"/v1/operator/cards/{holder.card_id}/entitlements", headers=bearer(admin_token))
    assert listed.status_code == 200, listed.text
    assert {item["region"] for item in listed.json()} == {SICHUAN, GUANGDONG}


async def test_park_sees_the_latest_of_two_passes_in_one_region(client: httpx.AsyncClient, admin_token: str) -> None:
    park = await factories.new_gate(client, admin_token, SICHUAN, "park", ["park"])
    shorter, longer = next_year(), next_year() + timedelta(days=180)
    seen = []
    # Both orders of granting, so the outcome cannot depend on the order rows come back in.
    for order in [(longer, shorter), (shorter, longer)]:
        holder = await factories.activated_holder(client, admin_token, SICHUAN)
        for until in order:
            assert (await grant_pass(client, admin_token, holder.card_id, SICHUAN, until)).status_code == 201
        seen.append(await pass_seen(client, park, holder))
    assert seen == [longer.isoformat(), longer.isoformat()]


async def test_entitlement_errors(client: httpx.AsyncClient, admin_token: str, holder: Holder) -> None:
    past = await grant_pass(client, admin_token, holder.card_id, SICHUAN, date.today() - timedelta(days=2))
    assert "past" in problem(past, 400)["detail"]
    unknown_card = await grant_pass(client, admin_token, "00000000-0000-4000-8000-000000000000", SICHUAN, next_year())
    assert problem(unknown_card, 404)["code"] == "not_found"
    unknown_region = await grant_pass(client, admin_token, holder.card_id, "990000", next_year())
    assert problem(unknown_region, 404)["code"] == "not_found"
    wrong_kind = await client.post(
        f"/v1/operator/cards/{holder.card_id}/entitlements",
        json={"kind": "free_lunch", "region": SICHUAN, "valid_until": next_year().isoformat()},
        headers=bearer(admin_token),
    )
    problem(wrong_kind, 400)
    unknown_entitlement = await client.delete(
        f"/v1/operator/cards/{holder.card_id}/entitlements/00000000-0000-4000-8000-000000000000",
        headers=bearer(admin_token),
    )
    assert problem(unknown_entitlement, 404)["code"] == "not_found"
    # None of it granted anything.
    listed = await client.get(f"/v1/operator/cards/{holder.card_id}/entitlements", headers=bearer(admin_token))
    assert listed.json() == []


# --- a hospital never answers without the profile --------------------------------------------


async def test_hospital_fails_closed_without_the_profile_and_reconciliation_restores_it(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, redis_url: str
) -> None:
    person = await known_person(client, admin_token)
    hospital = await factories.new_gate(client, admin_token, SICHUAN, "hospital", ["medical"])
    transit = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    medical = await credential(client, person.holder, "medical")
    card_ref = card_ref_of(context, medical)

    await drop_profile(context, redis_url, card_ref)

    body = await factories.verify(client, hospital, medical)
    assert (body["result"], body["reason"]) == ("rejected", "card_unknown")
    assert "claims" not in body
    # The status is still there: a gate that needs no profile accepts the card.
    await accepted(client, transit, await credential(client, person.holder))

    async with context.sessions() as session:
        found = await reconcile_status_mirror(session, context.mirror, context.pii, repair=True)
    assert found.profiles_missing >= 1 and found.repaired >= 1
    # The refusal stands: the hospital asking again about that scan gets it again, not an acceptance.
    repeated = await factories.verify(client, hospital, medical)
    assert (repeated["reason"], repeated["repeated"]) == ("card_unknown", True)
    assert repeated["verification_id"] == body["verification_id"]

    again = await accepted(client, hospital, await credential(client, person.holder, "medical"))
    assert again["claims"]["holder_name"] == HOLDER_NAME
    assert again["claims"]["citizen_id_masked"] == person.masked_citizen_id


async def test_hospital_retry_after_the_profile_vanished_fails_closed(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, redis_url: str
) -> None:
    person = await known_person(client, admin_token)
    hospital = await factories.new_gate(client, admin_token, SICHUAN, "hospital", ["medical"])
    medical = await credential(client, person.holder, "medical")
    first = await accepted(client, hospital, medical)
    await drop_profile(context, redis_url, card_ref_of(context, medical))
    # The same gate asking again gets its verification id back, but no answer without the profile.
    retry = await factories.verify(client, hospital, medical)
    assert (retry["result"], retry["reason"]) == ("rejected", "card_unknown")
    assert (retry["verification_id"], retry["repeated"]) == (first["verification_id"], True)
    assert "claims" not in retry


# --- rate limits -----------------------------------------------------------------------------


async def test_rate_limit_at_its_boundary_consumes_nothing(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    organisation = await new_organisation(client, admin_token, "transit")
    limited = await factories.new_terminal(
        client, admin_token, organisation, ["transit"], rate_per_minute=60, rate_burst=5
    )
    neighbour = await factories.new_terminal(client, admin_token, organisation, ["transit"])
    texts = await credentials_now(client, holder, 8)

    responses = await asyncio.gather(*(scan(client, limited, text) for text in texts[:5]))
    assert [response.status_code for response in responses] == [200] * 5
    assert all(response.json()["result"] == "accepted" for response in responses)

    refused = await scan(client, limited, texts[5])
    body = problem(refused, 429)
    assert body["code"] == "rate_limited"
    assert 0 < body["retry_after_ms"] <= 1000
    assert refused.headers["retry-after"] == "1"
    # Asking again at once is refused again, and costs nothing either.
    assert (await scan(client, limited, texts[5])).status_code == 429

    # Another terminal of the organisation has a budget of its own.
    await accepted(client, neighbour, texts[6])

    # One interval (1 s at 60/min) later one slot is free, and the refused credential was not used.
    await asyncio.sleep(body["retry_after_ms"] / 1000 + 0.05)
    late = await accepted(client, limited, texts[5])
    assert "repeated" not in late
    # That slot is taken again.
    assert problem(await scan(client, limited, texts[7]), 429)["code"] == "rate_limited"


async def test_rate_limit_is_exact_under_concurrency(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    organisation = await new_organisation(client, admin_token, "transit")
    # One a minute: nothing frees up while the test runs.
    limited = await factories.new_terminal(
        client, admin_token, organisation, ["transit"], rate_per_minute=1, rate_burst=5
    )
    neighbour = await factories.new_terminal(client, admin_token, organisation, ["transit"])
    texts = await credentials_now(client, holder, 12)
    responses = await asyncio.gather(*(scan(client, limited, text) for text in texts))
    statuses = [response.status_code for response in responses]
    assert sorted(statuses) == [200] * 5 + [429] * 7
    for text, response in zip(texts, responses, strict=True):
        if response.status_code == 429:
            assert problem(response, 429)["retry_after_ms"] > 50_000
            # Nothing consumed: another terminal accepts each refused credential.
            await accepted(client, neighbour, text)
        else:
            assert response.json()["result"] == "accepted"


async def test_changing_the_burst_takes_effect_at_once(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    organisation = await new_organisation(client, admin_token, "transit")
    # One verification per 10 s: the test is over long before a slot frees up.
    gate = await factories.new_terminal(client, admin_token, organisation, ["transit"], rate_per_minute=6, rate_burst=2)
    texts = await credentials_now(client, holder, 11)
    for text in texts[:2]:
        await accepted(client, gate, text)
    assert problem(await scan(client, gate, texts[2]), 429)["retry_after_ms"] > 9000

    changed = await patch_terminal(client, admin_token, gate, rate_burst=10)
    assert (changed["rate_per_minute"], changed["rate_burst"]) == (6, 10)
    # Ten in all since the start: the two before and eight more now; then the limit again.
    for text in texts[2:10]:
        await accepted(client, gate, text)
    problem(await scan(client, gate, texts[10]), 429)


# --- the same terminal asking again ----------------------------------------------------------


@pytest.mark.parametrize(("business_type", "purpose"), [("transit", "transit"), ("hospital", "medical")])
async def test_same_terminal_retry_gets_the_first_answer(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, business_type: str, purpose: str
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, business_type, [purpose])
    other = await factories.new_terminal(client, admin_token, gate.organisation_id, [purpose])
    text = await credential(client, holder, purpose)
    before = datetime.now(UTC)
    first = await accepted(client, gate, text)
    assert "repeated" not in first
    second = await accepted(client, gate, text)
    assert second["repeated"] is True
    assert second["verification_id"] == first["verification_id"]
    assert second["claims"] == first["claims"] and second["purpose"] == first["purpose"]

    replay = await factories.verify(client, other, text)
    assert (replay["result"], replay["reason"]) == ("rejected", "replayed")
    assert replay["verification_id"] != first["verification_id"]
    assert "claims" not in replay and "repeated" not in replay
    first_used = datetime.fromisoformat(replay["first_used_at"])
    assert before - timedelta(seconds=1) <= first_used <= datetime.now(UTC)

    # The other terminal's attempt did not take the credential over: the first gate still repeats.
    third = await accepted(client, gate, text)
    assert (third["verification_id"], third["repeated"]) == (first["verification_id"], True)


async def test_retry_window_ends(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    text = await credential(client, holder)
    app = create_app(make_settings(database_url, redis_url, redis_prefix, verify_retry_window=1))
    async with serve(app) as short_memory:
        assert app.state[STATE_KEY].settings.verify_retry_window == 1
        first = await accepted(short_memory, gate, text)
        assert (await accepted(short_memory, gate, text))["verification_id"] == first["verification_id"]
        await asyncio.sleep(1.1)
        late = await factories.verify(short_memory, gate, text)
    assert (late["result"], late["reason"]) == ("rejected", "replayed")
    assert late["verification_id"] != first["verification_id"]
    assert "repeated" not in late and late["first_used_at"]


# --- disabling an organisation ---------------------------------------------------------------


async def test_disabled_organisation_is_refused_at_once_and_audited(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    sibling = await factories.new_terminal(client, admin_token, gate.organisation_id, ["transit"])
    bystander = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    texts = await credentials_now(client, holder, 3)
    path = f"/v1/operator/verifier-organisations/{gate.organisation_id}"

    disabled = await client.patch(path, json={"enabled": False}, headers=bearer(admin_token))
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["enabled"] is False
    for each in (gate, sibling):
        assert problem(await scan(client, each, texts[0]), 401)["code"] == "unauthorized"
    # Other organisations carry on, and a terminal added while disabled is disabled too.
    await accepted(client, bystander, texts[1])
    late = await factories.new_terminal(client, admin_token, gate.organisation_id, ["transit"])
    problem(await scan(client, late, texts[0]), 401)

    enabled = await client.patch(path, json={"enabled": True}, headers=bearer(admin_token))
    assert enabled.status_code == 200 and enabled.json()["enabled"] is True
    # The refused credential was never used.
    await accepted(client, gate, texts[0])
    await accepted(client, sibling, texts[2])

    events = await audit_actions(client, admin_token, gate.organisation_id)
    actions = [event["action"] for event in events]
    assert actions[:2] == ["verifier_organisation.enabled", "verifier_organisation.disabled"]
    disabling = events[1]
    assert (disabling["before"], disabling["after"]) == ({"enabled": True}, {"enabled": False})
    assert disabling["subject_type"] == "verifier_organisation" and disabling["region"] == SICHUAN


# --- API key rotation ------------------------------------------------------------------------


async def test_rotation_without_overlap_ends_the_old_key_at_once(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    old = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    new, terminal = await rotate(client, admin_token, old)
    assert terminal["previous_key_expires_at"] is None
    text = await credential(client, holder)
    problem(await scan(client, old, text), 401)
    await accepted(client, new, text)
    events = await audit_actions(client, admin_token, old.terminal_id)
    assert events[0]["action"] == "terminal.api_key_rotated"
    assert old.api_key not in json.dumps(events) and new.api_key not in json.dumps(events)


async def test_rotation_with_overlap_keeps_both_keys_for_a_while(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    old = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    before = datetime.now(UTC)
    new, terminal = await rotate(client, admin_token, old, overlap_seconds=60)
    until = datetime.fromisoformat(terminal["previous_key_expires_at"])
    assert before + timedelta(seconds=59) <= until <= datetime.now(UTC) + timedelta(seconds=61)
    texts = await credentials_now(client, holder, 2)
    await accepted(client, old, texts[0])
    await accepted(client, new, texts[1])
    # Both keys are the same terminal: its retry window spans them.
    assert (await accepted(client, new, texts[0]))["repeated"] is True

    # A second rotation without overlap ends both earlier keys.
    newest, terminal = await rotate(client, admin_token, new)
    assert terminal["previous_key_expires_at"] is None
    text = await credential(client, holder)
    problem(await scan(client, old, text), 401)
    problem(await scan(client, new, text), 401)
    await accepted(client, newest, text)


async def test_the_old_key_stops_when_the_overlap_ends(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    old = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    new, terminal = await rotate(client, admin_token, old, overlap_seconds=1)
    texts = await credentials_now(client, holder, 3)
    await accepted(client, old, texts[0])
    until = datetime.fromisoformat(terminal["previous_key_expires_at"])
    await asyncio.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 0.05)
    problem(await scan(client, old, texts[1]), 401)
    await accepted(client, new, texts[1])


async def test_overlap_does_not_depend_on_the_server_time_zone(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    old = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Shanghai"
    time.tzset()
    try:
        new, _ = await rotate(client, admin_token, old, overlap_seconds=3600)
        texts = await credentials_now(client, holder, 2)
        await accepted(client, new, texts[1])
        await accepted(client, old, texts[0])
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


async def test_terminal_times_carry_their_zone(client: httpx.AsyncClient, admin_token: str) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    await rotate(client, admin_token, gate, overlap_seconds=60)
    terminal = await patch_terminal(client, admin_token, gate, rate_burst=7)
    for name in ("created_at", "previous_key_expires_at"):
        assert datetime.fromisoformat(terminal[name]).tzinfo is not None, (name, terminal[name])


@pytest.mark.parametrize("overlap", ["-1", str(MAX_KEY_OVERLAP + 1), "soon"])
async def test_rotation_overlap_out_of_range_is_400(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, overlap: str
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    response = await client.post(
        f"/v1/operator/terminals/{gate.terminal_id}/api-key",
        params={"overlap_seconds": overlap},
        headers=bearer(admin_token),
    )
    problem(response, 400)
    # Nothing changed: the key still works.
    await accepted(client, gate, await credential(client, holder))


async def test_rotation_overlap_of_a_week_is_allowed(client: httpx.AsyncClient, admin_token: str) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    _, terminal = await rotate(client, admin_token, gate, overlap_seconds=MAX_KEY_OVERLAP)
    until = datetime.fromisoformat(terminal["previous_key_expires_at"])
    assert until - datetime.now(UTC) > timedelta(days=6, hours=23)


# --- signed requests -------------------------------------------------------------------------


def signed(
    key: Ed25519PrivateKey | Sm2SigningKey,
    terminal_id: str,
    body: bytes,
    *,
    timestamp: int | str | None = None,
    path: str = "/v1/verify",
) -> dict[str, str]:
    """Headers of a request signed by the terminal's key."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = key.sign(signing_input("POST", path, stamp, body))
    return {
        "content-type": "application/json",
        "X-Terminal-Id": terminal_id,
        "X-Signature-Timestamp": stamp,
        "X-Signature": b64url(signature),
    }


def verify_body(text: str) -> bytes:
    """The exact JSON bytes of a verify request."""
    return json.dumps({"credential": text}, separators=(",", ":")).encode()


async def signing_gate(client: httpx.AsyncClient, token: str) -> tuple[Gate, Ed25519PrivateKey, dict[str, Any]]:
    """A transit gate that registered an Ed25519 key; its TerminalOut."""
    gate = await factories.new_gate(client, token, SICHUAN, "transit", ["transit"])
    key = Ed25519PrivateKey.generate()
    response = await client.put(
        f"/v1/operator/terminals/{gate.terminal_id}/signing-key",
        json={"public_key": b64url(public_raw(key))},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    terminal: dict[str, Any] = response.json()
    return gate, key, terminal


async def test_signed_requests_replace_the_api_key(client: httpx.AsyncClient, admin_token: str, holder: Holder) -> None:
    gate, key, terminal = await signing_gate(client, admin_token)
    assert terminal["signs_requests"] is True
    texts = await credentials_now(client, holder, 2)
    refused = await scan(client, gate, texts[0])
    assert problem(refused, 401)["code"] == "unauthorized"

    body = verify_body(texts[0])
    response = await client.post("/v1/verify", content=body, headers=signed(key, gate.terminal_id, body))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["result"] == "accepted" and set(answer["claims"]) == {"card_pseudonym"}
    # The terminal id may be spelled without hyphens, in upper case; a clock 20 s behind is tolerated.
    body = verify_body(texts[1])
    spelled = signed(key, gate.terminal_id.replace("-", "").upper(), body, timestamp=int(time.time()) - 20)
    assert (await client.post("/v1/verify", content=body, headers=spelled)).json()["result"] == "accepted"
    events = await audit_actions(client, admin_token, gate.terminal_id)
    assert events[0]["action"] == "terminal.signing_key_registered"


BAD_SIGNATURES = [
    "wrong key",
    "body changed",
    "other path",
    "old timestamp",
    "future timestamp",
    "unknown terminal",
    "garbled signature",
    "no terminal id",
    "no timestamp",
    "no signature",
]


@pytest.mark.parametrize("case", BAD_SIGNATURES)
async def test_bad_signed_requests_are_401_and_consume_nothing(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, case: str
) -> None:
    gate, key, _ = await signing_gate(client, admin_token)
    text = await credential(client, holder)
    body = verify_body(text)
    now = int(time.time())
    sent = body
    if case == "wrong key":
        headers = signed(Ed25519PrivateKey.generate(), gate.terminal_id, body)
    elif case == "body changed":
        headers = signed(key, gate.terminal_id, body)
        sent = json.dumps({"credential": text}).encode()  # the same request, other bytes
        assert sent != body
    elif case == "other path":
        headers = signed(key, gate.terminal_id, body, path="/v1/verify/batch")
    elif case == "old timestamp":
        headers = signed(key, gate.terminal_id, body, timestamp=now - 120)
    elif case == "future timestamp":
        headers = signed(key, gate.terminal_id, body, timestamp=now + 120)
    elif case == "unknown terminal":
        headers = signed(key, "00000000-0000-4000-8000-000000000000", body)
    elif case == "garbled signature":
        headers = {**signed(key, gate.terminal_id, body), "X-Signature": "not base64url!"}
    else:
        header = {"no terminal id": "X-Terminal-Id", "no timestamp": "X-Signature-Timestamp"}.get(case, "X-Signature")
        headers = signed(key, gate.terminal_id, body)
        del headers[header]
    response = await client.post("/v1/verify", content=sent, headers=headers)
    assert problem(response, 401)["code"] == "unauthorized"
    # The credential is still unused: the correctly signed request gets it.
    good = await client.post("/v1/verify", content=body, headers=signed(key, gate.terminal_id, body))
    assert good.status_code == 200 and good.json()["result"] == "accepted", good.text


@pytest.mark.parametrize(
    "public_key",
    [
        pytest.param(b64url(bytes(31)), id="31-bytes"),
        pytest.param(b64url(bytes(33)), id="33-bytes"),
        pytest.param(base64.urlsafe_b64encode(bytes(32)).decode(), id="padded"),
        pytest.param("", id="empty"),
    ],
)
async def test_bad_public_key_is_400(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, public_key: str
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    response = await client.put(
        f"/v1/operator/terminals/{gate.terminal_id}/signing-key",
        json={"public_key": public_key},
        headers=bearer(admin_token),
    )
    problem(response, 400)
    # Still an API-key terminal.
    await accepted(client, gate, await credential(client, holder))


async def sm2_signing_gate(client: httpx.AsyncClient, token: str, **extra: str) -> tuple[Gate, Sm2SigningKey]:
    """A transit gate that registered an SM2 key (the national profile's terminals)."""
    gate = await factories.new_gate(client, token, SICHUAN, "transit", ["transit"])
    key = Sm2SigningKey.generate()
    response = await client.put(
        f"/v1/operator/terminals/{gate.terminal_id}/signing-key",
        json={"public_key": b64url(key.public), **extra},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    assert response.json()["signs_requests"] is True
    return gate, key


@pytest.mark.parametrize("named", [pytest.param({"algorithm": "SM2"}, id="named"), pytest.param({}, id="by-length")])
async def test_sm2_signed_requests_are_accepted_and_audited(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, named: dict[str, str]
) -> None:
    gate, key = await sm2_signing_gate(client, admin_token, **named)
    texts = await credentials_now(client, holder, 2)
    assert problem(await scan(client, gate, texts[0]), 401)["code"] == "unauthorized"  # the API key stopped
    for text in texts:
        body = verify_body(text)
        response = await client.post("/v1/verify", content=body, headers=signed(key, gate.terminal_id, body))
        assert response.status_code == 200 and response.json()["result"] == "accepted", response.text
    events = await audit_actions(client, admin_token, gate.terminal_id)
    assert events[0]["action"] == "terminal.signing_key_registered"


async def test_a_terminal_key_verifies_only_its_own_algorithm(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    """No algorithm confusion: an Ed25519 signature never passes for an SM2 terminal, nor the reverse."""
    sm2_gate, sm2_key = await sm2_signing_gate(client, admin_token)
    ed_gate, _, _ = await signing_gate(client, admin_token)
    text = await credential(client, holder)
    body = verify_body(text)
    for gate, wrong in ((sm2_gate, Ed25519PrivateKey.generate()), (ed_gate, Sm2SigningKey.generate())):
        response = await client.post("/v1/verify", content=body, headers=signed(wrong, gate.terminal_id, body))
        assert problem(response, 401)["code"] == "unauthorized"
    # Nothing was consumed: the SM2 gate's own signature takes the credential.
    good = await client.post("/v1/verify", content=body, headers=signed(sm2_key, sm2_gate.terminal_id, body))
    assert good.json()["result"] == "accepted", good.text


@pytest.mark.parametrize(
    ("raw", "extra"),
    [
        pytest.param(b"\x04" + bytes(64), {}, id="sm2-point-off-the-curve"),
        pytest.param(b"\x02" + bytes(64), {}, id="65-bytes-not-uncompressed"),
        pytest.param(public_raw(Ed25519PrivateKey.generate()), {"algorithm": "SM2"}, id="ed25519-key-named-sm2"),
        pytest.param(Sm2SigningKey.generate().public, {"algorithm": "Ed25519"}, id="sm2-key-named-ed25519"),
    ],
)
async def test_bad_sm2_terminal_key_is_400_and_stores_nothing(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, raw: bytes, extra: dict[str, str]
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    response = await client.put(
        f"/v1/operator/terminals/{gate.terminal_id}/signing-key",
        json={"public_key": b64url(raw), **extra},
        headers=bearer(admin_token),
    )
    assert problem(response, 400)["code"] == "bad_request"
    await accepted(client, gate, await credential(client, holder))


async def test_national_workers_hash_api_keys_with_sm3_and_every_worker_accepts_both(
    client: httpx.AsyncClient,
    context: ServiceContext,
    admin_token: str,
    holder: Holder,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A profile switch without re-issuing terminal keys: a national worker stores SM3 hashes of the keys it
    issues (and rotates), and every worker accepts keys of both kinds."""
    international_gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    national_app = create_app(make_settings(database_url, redis_url, redis_prefix, crypto_profile="national"))
    async with serve(national_app) as national:
        national_gate = await factories.new_gate(national, admin_token, SICHUAN, "transit", ["transit"])
        rotated = await national.post(
            f"/v1/operator/terminals/{international_gate.terminal_id}/api-key",
            params={"overlap_seconds": 600},
            headers=bearer(admin_token),
        )
        assert rotated.status_code == 201, rotated.text
        rotated_key = rotated.json()["api_key"]
        rotated_gate = Gate(international_gate.terminal_id, international_gate.organisation_id, rotated_key)
        async with context.sessions() as session:
            hashes = {
                gate.terminal_id: (await session.get(Terminal, uuid.UUID(gate.terminal_id)))
                for gate in (national_gate, international_gate)
            }
        for gate, algorithm in ((national_gate, "sm3"), (rotated_gate, "sm3")):
            secret = gate.api_key.split(".")[2]
            assert hashes[gate.terminal_id].api_key_hash == hashlib.new(algorithm, secret.encode()).digest()
        old_secret = international_gate.api_key.split(".")[2]
        assert hashes[international_gate.terminal_id].previous_key_hash == hashlib.sha256(old_secret.encode()).digest()
        workers = ((national, national_app.state[STATE_KEY]), (client, context))
        for http, worker in workers:
            await worker.directory.refresh()
            # The old SHA-256 key in its overlap, the SM3 keys of the national worker: all of them, on both.
            for gate in (international_gate, rotated_gate, national_gate):
                await accepted(http, gate, await credential(client, holder))
            wrong = Gate(national_gate.terminal_id, national_gate.organisation_id, national_gate.api_key[:-2] + "AA")
            response = await http.post("/v1/verify", json={"credential": "x"}, headers=wrong.headers)
            assert problem(response, 401)["code"] == "unauthorized"


async def test_absurdly_long_timestamp_is_401(client: httpx.AsyncClient, admin_token: str, holder: Holder) -> None:
    gate, key, _ = await signing_gate(client, admin_token)
    body = verify_body(await credential(client, holder))
    headers = signed(key, gate.terminal_id, body, timestamp="1" * 5000)
    response = await client.post("/v1/verify", content=body, headers=headers)
    assert problem(response, 401)["code"] == "unauthorized"


@pytest.mark.parametrize("raw", [pytest.param(bytes(32), id="zeros"), pytest.param(b"\xff" * 32, id="ff")])
async def test_public_key_that_is_no_usable_point_is_400(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, raw: bytes
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    response = await client.put(
        f"/v1/operator/terminals/{gate.terminal_id}/signing-key",
        json={"public_key": b64url(raw)},
        headers=bearer(admin_token),
    )
    problem(response, 400)
    # Nothing was stored: the terminal still authenticates with its API key.
    await accepted(client, gate, await credential(client, holder))


async def test_rotating_the_api_key_ends_request_signing(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    gate, key, _ = await signing_gate(client, admin_token)
    # Even with an overlap asked for: a signing terminal has no old key to keep.
    rotated, terminal = await rotate(client, admin_token, gate, overlap_seconds=60)
    assert terminal["signs_requests"] is False and terminal["previous_key_expires_at"] is None
    texts = await credentials_now(client, holder, 2)
    body = verify_body(texts[0])
    problem(await client.post("/v1/verify", content=body, headers=signed(key, gate.terminal_id, body)), 401)
    problem(await scan(client, gate, texts[0]), 401)
    await accepted(client, rotated, texts[0])

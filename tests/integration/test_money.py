"""Money that moves exactly once: fares, medical settlements, subsidies, idempotency keys, reconciliation."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import func, select

from app.db.clock import utcnow
from app.db.models import IdempotencyRecord, LedgerPosting, LedgerTransaction
from app.domain.ledger.idempotency import request_hash
from app.server.context import ServiceContext
from tests import factories
from tests.factories import Gate, Holder, bearer, problem


async def drain(context: ServiceContext) -> None:
    """Store every verification event waiting in the stream (the drain runs beside the service)."""
    drainer = context.event_drain(block_ms=0, claim_idle_ms=60_000)
    while await drainer.run_once():
        pass


def key() -> dict[str, str]:
    return {"Idempotency-Key": secrets.token_urlsafe(12)}


async def verified(client: httpx.AsyncClient, context: ServiceContext, holder: Holder, gate: Gate, purpose: str) -> str:
    """An accepted verification of purpose at gate, stored in the database; its id."""
    [credential] = await factories.credentials(client, holder, purpose)
    answer = await factories.verify(client, gate, credential)
    assert answer["result"] == "accepted", answer
    await drain(context)
    return str(answer["verification_id"])


async def holder_with_scheme(client: httpx.AsyncClient, token: str, region: str, scheme: str) -> Holder:
    response = await client.post(
        "/v1/operator/cards",
        json={
            "region": region,
            "citizen_id": factories.citizen_id(region),
            "name": "李四",
            "card_number": factories.card_number(),
            "insurance_scheme": scheme,
        },
        headers=bearer(token),
    )
    assert response.status_code == 201, response.text
    issued = response.json()
    session = await factories.activate(client, issued["card"]["card_number"], issued["activation_code"])
    return Holder(
        issued["card"]["card_id"], issued["card"]["ecard_id"], issued["card"]["card_number"],
        session["access_token"], session["refresh_token"],
    )  # fmt: skip


async def statement(client: httpx.AsyncClient, holder: Holder) -> dict[str, Any]:
    response = await client.get("/v1/holder/transactions", auth=holder.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_fare_is_charged_once_and_its_key_replays(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, holder: Holder, gate: Gate
) -> None:
    verification_id = await verified(client, context, holder, gate, "transit")
    headers = {**gate.headers, **key()}
    body = {"verification_id": verification_id, "amount_fen": 300, "route": "Line 1"}
    first = await client.post("/v1/terminal/fares", json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = await client.post("/v1/terminal/fares", json=body, headers=headers)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    # The same key with another body is refused; another key for the same verification too.
    other_body = problem(
        await client.post("/v1/terminal/fares", json={**body, "amount_fen": 400}, headers=headers), 422
    )
    assert other_body["code"] == "idempotency_key_reused"
    second_fare = problem(await client.post("/v1/terminal/fares", json=body, headers={**gate.headers, **key()}), 409)
    assert "already been charged" in second_fare["detail"]

    account = await statement(client, holder)
    assert account["balance_fen"] == -300
    assert [(m["kind"], m["amount_fen"]) for m in account["movements"]] == [("transit_fare", -300)]
    async with context.sessions() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(LedgerTransaction)
            .where(LedgerTransaction.verification_id == verification_id)
        )
    assert count == 1

    response = await client.get(
        f"/v1/operator/verifier-organisations/{gate.organisation_id}/reconciliation", headers=bearer(admin_token)
    )
    assert response.status_code == 200, response.text
    day = response.json()
    assert day["balanced"] is True and day["total_fen"] == 0
    assert day["by_kind"]["transit_fare"]["card"] == -day["by_kind"]["transit_fare"]["organisation"] <= -300


async def test_fares_refuse_what_they_should(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, holder: Holder, gate: Gate
) -> None:
    body = {"verification_id": "vf_" + "A" * 16, "amount_fen": 300}
    missing_key = problem(await client.post("/v1/terminal/fares", json=body, headers=gate.headers), 400)
    assert "Idempotency-Key" in missing_key["detail"]
    assert problem(await client.post("/v1/terminal/fares", json=body, headers=key()), 401)
    # A verification the stream has not delivered yet: 409 with Retry-After, and the key stays usable.
    [credential] = await factories.credentials(client, holder)
    fresh = await factories.verify(client, gate, credential)
    attempt = {**gate.headers, **key()}
    body = {"verification_id": fresh["verification_id"], "amount_fen": 250}
    early = await client.post("/v1/terminal/fares", json=body, headers=attempt)
    assert problem(early, 409)["code"] == "verification_not_recorded" and early.headers["retry-after"] == "1"
    await drain(context)
    assert (await client.post("/v1/terminal/fares", json=body, headers=attempt)).status_code == 201
    # A rejected verification, another organisation's, a hospital's terminal: no fare.
    other = await factories.new_gate(client, admin_token, "510000", "transit", ["transit"])
    [used] = await factories.credentials(client, holder)
    await factories.verify(client, gate, used)
    replay = await factories.verify(client, other, used)
    await drain(context)
    rejected = {"verification_id": replay["verification_id"], "amount_fen": 100}
    assert (
        "accepted"
        in problem(await client.post("/v1/terminal/fares", json=rejected, headers={**other.headers, **key()}), 409)[
            "detail"
        ]
    )
    foreign = {"verification_id": fresh["verification_id"], "amount_fen": 100}
    assert problem(await client.post("/v1/terminal/fares", json=foreign, headers={**other.headers, **key()}), 404)
    hospital = await factories.new_gate(client, admin_token, "510000", "hospital", ["medical"])
    assert problem(await client.post("/v1/terminal/fares", json=foreign, headers={**hospital.headers, **key()}), 403)
    for bad in ({**body, "amount_fen": 0}, {**body, "amount_fen": -5}, {**body, "verification_id": "nope"}):
        assert problem(await client.post("/v1/terminal/fares", json=bad, headers={**gate.headers, **key()}), 400)


async def test_medical_bills_split_by_scheme_and_region(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    hospital = await factories.new_gate(client, admin_token, "510000", "hospital", ["medical"])
    local = await holder_with_scheme(client, admin_token, "510000", "urban_employee")
    visitor = await holder_with_scheme(client, admin_token, "500000", "urban_rural_resident")

    async def settle(holder: Holder, total: int) -> dict[str, Any]:
        verification_id = await verified(client, context, holder, hospital, "medical")
        response = await client.post(
            "/v1/terminal/medical-settlements",
            json={"verification_id": verification_id, "total_fen": total},
            headers={**hospital.headers, **key()},
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    at_home = await settle(local, 10_001)
    assert (at_home["share_bp"], at_home["cross_region"]) == (8500, False)
    assert (at_home["insurance_fen"], at_home["holder_fen"]) == (8500, 1501)  # the fund's share rounds down
    # A Chongqing resident in Chengdu (the agreement covers medical): Chongqing's cross-region rate.
    away = await settle(visitor, 20_000)
    assert (away["share_bp"], away["cross_region"]) == (6000, True)
    assert (away["insurance_fen"], away["holder_fen"]) == (12_000, 8_000)
    assert (await statement(client, visitor))["balance_fen"] == -8_000

    response = await client.get(
        f"/v1/operator/verifier-organisations/{hospital.organisation_id}/reconciliation", headers=bearer(admin_token)
    )
    day = response.json()
    assert day["balanced"] and day["transactions"] == 2
    assert day["by_kind"]["medical_settlement"] == {"insurance_fund": -20_500, "card": -9_501, "organisation": 30_001}


async def test_subsidies_are_all_or_nothing_and_replay(client: httpx.AsyncClient, admin_token: str) -> None:
    holders = [await factories.activated_holder(client, admin_token, "510000") for _ in range(3)]
    payouts = [{"card_id": holder.card_id, "amount_fen": 5_000 + i} for i, holder in enumerate(holders)]
    outsider = await factories.activated_holder(client, admin_token, "500000")
    batch_key = key()
    bad = {
        "region": "510000",
        "reason": "heating subsidy",
        "payouts": [*payouts, {"card_id": outsider.card_id, "amount_fen": 1}],
    }
    refused = problem(
        await client.post("/v1/operator/subsidy-batches", json=bad, headers={**bearer(admin_token), **key()}), 400
    )
    assert outsider.card_id in refused["detail"]
    assert [(await statement(client, holder))["balance_fen"] for holder in holders] == [0, 0, 0]

    body = {"region": "510000", "reason": "heating subsidy", "payouts": payouts}
    paid = await client.post("/v1/operator/subsidy-batches", json=body, headers={**bearer(admin_token), **batch_key})
    assert paid.status_code == 201, paid.text
    assert paid.json()["total_fen"] == 15_003 and paid.json()["payouts"] == 3
    again = await client.post("/v1/operator/subsidy-batches", json=body, headers={**bearer(admin_token), **batch_key})
    assert again.json() == paid.json() and again.headers["idempotent-replayed"] == "true"
    assert [(await statement(client, holder))["balance_fen"] for holder in holders] == [5_000, 5_001, 5_002]
    twice = {**body, "payouts": [payouts[0], payouts[0]]}
    assert problem(
        await client.post("/v1/operator/subsidy-batches", json=twice, headers={**bearer(admin_token), **key()}), 400
    )


async def test_a_request_in_flight_is_409_until_it_is_stale(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, gate: Gate
) -> None:
    verification_id = await verified(client, context, holder, gate, "transit")
    idempotency = key()
    body = {"verification_id": verification_id, "amount_fen": 200}
    # A first attempt that claimed the key and died before its commit (or is still running).
    async with context.sessions() as session:
        raw = httpx.Request("POST", "http://testserver/v1/terminal/fares", json=body)
        session.add(
            IdempotencyRecord(
                caller=f"terminal:{uuid.UUID(gate.terminal_id).hex}",
                key=idempotency["Idempotency-Key"],
                request_hash=request_hash("POST", "/v1/terminal/fares", raw.content),
                created_at=utcnow(),
            )
        )
        await session.commit()
    send = {**gate.headers, **idempotency, "content-type": "application/json"}
    in_flight = await client.post("/v1/terminal/fares", content=raw.content, headers=send)
    assert "in progress" in problem(in_flight, 409)["detail"]
    async with context.sessions() as session:
        record = await session.get(
            IdempotencyRecord, (f"terminal:{uuid.UUID(gate.terminal_id).hex}", idempotency["Idempotency-Key"])
        )
        assert record is not None
        record.created_at = utcnow() - timedelta(seconds=31)
        await session.commit()
    taken_over = await client.post("/v1/terminal/fares", content=raw.content, headers=send)
    assert taken_over.status_code == 201, taken_over.text


async def test_concurrent_duplicates_charge_once(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, gate: Gate
) -> None:
    ids = [await verified(client, context, holder, gate, "transit") for _ in range(3)]
    sends = []
    for verification_id in ids:
        same_key = {**gate.headers, **key()}
        body = {"verification_id": verification_id, "amount_fen": 150}
        sends += [client.post("/v1/terminal/fares", json=body, headers=same_key) for _ in range(4)]
        # And with keys of their own: only the database constraint stands between them and a double charge.
        sends += [client.post("/v1/terminal/fares", json=body, headers={**gate.headers, **key()}) for _ in range(3)]
    responses = await asyncio.gather(*sends)
    assert {response.status_code for response in responses} <= {201, 409}
    async with context.sessions() as session:
        rows = (
            await session.execute(
                select(LedgerTransaction.verification_id, func.count())
                .where(LedgerTransaction.verification_id.in_(ids))
                .group_by(LedgerTransaction.verification_id)
            )
        ).all()
        unbalanced = await session.scalar(
            select(func.count()).select_from(
                select(LedgerPosting.transaction_id)
                .group_by(LedgerPosting.transaction_id)
                .having(func.sum(LedgerPosting.amount_fen) != 0)
                .subquery()
            )
        )
    assert sorted(count for _, count in rows) == [1, 1, 1]
    assert unbalanced == 0


async def test_a_distance_fare_pays_for_one_trip_from_entry_to_exit(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, holder: Holder, gate: Gate
) -> None:
    exit_gate = await factories.new_terminal(client, admin_token, gate.organisation_id, ["transit"])
    entry_id = await verified(client, context, holder, gate, "transit")
    exit_id = await verified(client, context, holder, exit_gate, "transit")
    trip = {"verification_id": exit_id, "entry_verification_id": entry_id, "amount_fen": 600, "route": "L2 A>B"}
    charged = await client.post("/v1/terminal/fares", json=trip, headers={**exit_gate.headers, **key()})
    assert charged.status_code == 201, charged.text
    # The entry cannot pay for a second trip, nor be charged as the exit of one.
    second_exit = await verified(client, context, holder, exit_gate, "transit")
    reuse = {**trip, "verification_id": second_exit}
    assert problem(await client.post("/v1/terminal/fares", json=reuse, headers={**exit_gate.headers, **key()}), 409)
    backwards = {"verification_id": entry_id, "entry_verification_id": second_exit, "amount_fen": 600}
    assert (
        "before the exit"
        in problem(await client.post("/v1/terminal/fares", json=backwards, headers={**gate.headers, **key()}), 409)[
            "detail"
        ]
    )
    other = await factories.activated_holder(client, admin_token, "510000")
    stranger = await verified(client, context, other, exit_gate, "transit")
    swapped = {"verification_id": stranger, "entry_verification_id": second_exit, "amount_fen": 600}
    assert (
        "different cards"
        in problem(await client.post("/v1/terminal/fares", json=swapped, headers={**exit_gate.headers, **key()}), 409)[
            "detail"
        ]
    )
    assert (await statement(client, holder))["balance_fen"] <= -600

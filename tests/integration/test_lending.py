"""Library loans across the network (lent in Chengdu, returned in Chongqing) and park entries on an annual pass."""

from __future__ import annotations

from datetime import date

import httpx

from app.server.context import ServiceContext
from tests import factories
from tests.factories import bearer, problem
from tests.integration.test_money import drain, key, verified


async def test_a_book_lent_in_chengdu_comes_back_in_chongqing(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    reader = await factories.activated_holder(client, admin_token, "510000")
    chengdu = await factories.new_gate(client, admin_token, "510000", "library", ["library"])
    chongqing = await factories.new_gate(client, admin_token, "500000", "library", ["library"])
    guangzhou = await factories.new_gate(client, admin_token, "440000", "library", ["library"])
    item = f"CDLIB-{factories.card_number()}"
    verification_id = await verified(client, context, reader, chengdu, "library")
    loan_key = {**chengdu.headers, **key()}
    body = {"verification_id": verification_id, "item_id": item, "days": 21}
    lent = await client.post("/v1/terminal/library-loans", json=body, headers=loan_key)
    assert lent.status_code == 201, lent.text
    assert (await client.post("/v1/terminal/library-loans", json=body, headers=loan_key)).json() == lent.json()
    # The item is out: no second loan of it, even on a new verification.
    again = await verified(client, context, reader, chengdu, "library")
    out = {"verification_id": again, "item_id": item}
    assert (
        "on loan"
        in problem(
            await client.post("/v1/terminal/library-loans", json=out, headers={**chengdu.headers, **key()}), 409
        )["detail"]
    )

    # Guangdong is not in the Sichuan-Chongqing library network; Chongqing is.
    refused = await client.post(
        "/v1/terminal/library-returns", json={"item_id": item}, headers={**guangzhou.headers, **key()}
    )
    assert "network" in problem(refused, 403)["detail"]
    returned = await client.post(
        "/v1/terminal/library-returns", json={"item_id": item}, headers={**chongqing.headers, **key()}
    )
    assert returned.status_code == 201, returned.text
    assert returned.json()["loan_id"] == lent.json()["loan_id"] and returned.json()["returned_at"]
    assert problem(
        await client.post(
            "/v1/terminal/library-returns", json={"item_id": item}, headers={**chongqing.headers, **key()}
        ),
        404,
    )

    loans = await client.get("/v1/holder/loans", auth=reader.auth)
    assert [(loan["item_id"], loan["returned_to"] is not None) for loan in loans.json()] == [(item, True)]


async def test_park_entries_count_against_the_annual_pass(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    visitor = await factories.activated_holder(client, admin_token, "510000")
    park = await factories.new_gate(client, admin_token, "510000", "park", ["park"])
    first = await verified(client, context, visitor, park, "park")
    no_pass = await client.post(
        "/v1/terminal/park-entries", json={"verification_id": first}, headers={**park.headers, **key()}
    )
    assert "no annual pass" in problem(no_pass, 409)["detail"]

    grant = {
        "kind": "park_annual_pass",
        "region": "510000",
        "valid_until": date(date.today().year + 1, 12, 31).isoformat(),
    }
    response = await client.post(
        f"/v1/operator/cards/{visitor.card_id}/entitlements", json=grant, headers=bearer(admin_token)
    )
    assert response.status_code == 201, response.text
    counts = []
    for _ in range(2):
        verification_id = await verified(client, context, visitor, park, "park")
        entry = await client.post(
            "/v1/terminal/park-entries", json={"verification_id": verification_id}, headers={**park.headers, **key()}
        )
        assert entry.status_code == 201, entry.text
        counts.append(entry.json()["entries_on_pass"])
    assert counts == [1, 2]
    # One entry per verification, whatever the key.
    twice = await client.post(
        "/v1/terminal/park-entries", json={"verification_id": verification_id}, headers={**park.headers, **key()}
    )
    assert problem(twice, 409)
    # A transit gate cannot count park entries.
    transit = await factories.new_gate(client, admin_token, "510000", "transit", ["transit"])
    assert problem(
        await client.post(
            "/v1/terminal/park-entries", json={"verification_id": first}, headers={**transit.headers, **key()}
        ),
        403,
    )
    await drain(context)

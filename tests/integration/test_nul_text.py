"""U+0000 (NUL) in a request's text is a 400 problem on both backends, never a 500 and never a write.

PostgreSQL cannot store NUL in text, so these were 500s there (schemathesis found the first);
SQLite stored them. app.http.nul_text refuses them before a handler runs.
"""

from __future__ import annotations

import httpx

from tests import factories
from tests.factories import bearer, problem


async def test_a_nul_in_a_json_string_or_key_is_refused_and_nothing_is_written(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    operator = bearer(admin_token)
    region = {"code": "530000", "name": "云\u0000南"}
    response = await client.post("/v1/operator/regions", json=region, headers=operator)
    assert "U+0000" in problem(response, 400)["detail"]
    regions = await client.get("/v1/operator/regions", headers=operator)
    assert "530000" not in {region["code"] for region in regions.json()}
    nested = {"name": "org", "business_type": "transit", "region": "510000", "x\u0000": 1}
    problem(await client.post("/v1/operator/verifier-organisations", json=nested, headers=operator), 400)
    problem(await client.post("/v1/operator/session", json={"username": "a\u0000", "password": "x" * 16}), 400)
    card = {"card_number": "T\u00001234567"}
    problem(await client.post("/v1/operator/cards/search", json=card, headers=operator), 400)


async def test_a_backslash_before_u0000_is_text_not_a_nul(client: httpx.AsyncClient, admin_token: str) -> None:
    """The body check looks for the escape first; an escaped backslash followed by `u0000` is six plain characters."""
    response = await client.post(
        "/v1/operator/cards/search", json={"card_number": "\\u0000"}, headers=bearer(admin_token)
    )
    assert response.status_code == 200, response.text


async def test_a_nul_in_the_path_or_the_query_is_refused(client: httpx.AsyncClient, admin_token: str) -> None:
    operator = bearer(admin_token)
    for params in ({"action": "card.issued\x00"}, {"subject_id": "\x00"}, {"x\x00": "1"}):
        response = await client.get("/v1/operator/audit-events", params=params, headers=operator)
        assert "U+0000" in problem(response, 400)["detail"], params
    problem(await client.get("/v1/catalog/services/a%00b"), 400)
    # Without a NUL the same filter is an ordinary query.
    response = await client.get("/v1/operator/audit-events", params={"action": "card.issued"}, headers=operator)
    assert response.status_code == 200, response.text


async def test_a_holder_text_with_a_nul_is_refused(client: httpx.AsyncClient, holder: factories.Holder) -> None:
    response = await client.post("/v1/holder/card/loss", json={"reason": "lost\u0000"}, auth=holder.auth)
    problem(response, 400)
    card = await client.get("/v1/holder/card", auth=holder.auth)
    assert card.json()["ecard_state"] == "active"

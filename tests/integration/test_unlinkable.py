"""Codes no one can link (issue 13, item 4): many codes of one card, issued by the service, share nothing
but issuer, kid, alg, purpose and times; only the issuer's verify path resolves them to the card.

Run for an Ed25519 region and an SM2 one, against SQLite and PostgreSQL (tests/conftest.py).
"""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import select

from app.db.models import ECard
from app.server.context import ServiceContext
from crypto.credential import open_credential
from tests import factories
from tests.factories import bearer
from tests.unlinkability import assert_unlinkable

SM2_REGION = "520000"
BUNDLES = 3


@pytest.mark.parametrize("algorithm", ["Ed25519", "SM2"])
async def test_codes_of_one_card_share_no_value_but_the_allowed_fields(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, algorithm: str
) -> None:
    region = "510000"
    if algorithm == "SM2":
        region = SM2_REGION
        created = await client.post(
            "/v1/operator/regions",
            json={"code": region, "name": "贵州省", "key_algorithm": "SM2"},
            headers=bearer(admin_token),
        )
        assert created.status_code == 201, created.text
    holder = await factories.activated_holder(client, admin_token, region)
    # Bundles asked for back to back: their first codes usually share an nbf, and must differ anyway.
    codes = [code for _ in range(BUNDLES) for code in await factories.credentials(client, holder, "transit", count=20)]
    async with context.sessions() as session:
        ecard = await session.scalar(select(ECard).where(ECard.id == uuid.UUID(holder.ecard_id)))
    assert ecard is not None
    card_ref = bytes(ecard.card_ref)

    parts = assert_unlinkable(codes, card_ref)
    assert len(parts) == BUNDLES * 20
    # What they do share is exactly what is allowed: one header (alg and kid), one iss, one purpose.
    assert len({part.allowed[0] for part in parts}) == 1
    assert {(part.allowed[1], part.allowed[4]) for part in parts} == {(region, 1)}
    # And the issuer resolves every one of them to the card.
    keys = context.directory.keys
    assert {open_credential(code, keys.verify_keys, keys.seals).claims.card_ref for code in codes} == {card_ref}

    # A gate accepts one online: the verify path opens the seal with the key it holds.
    gate = await factories.new_gate(client, admin_token, region, "transit", ["transit"])
    assert (await factories.verify(client, gate, codes[0]))["result"] == "accepted"

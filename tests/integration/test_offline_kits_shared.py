"""Offline kits signed once per interval for the deployment, kept in the database and served by every worker.

A worker here is an `OfflineKits` of its own (what each process holds) on the shared database; the
lease on the kit's row lets one build run at a time; the build reads no eCard (codes are unlinkable and
carry no status index, so a kit names no card). Every test runs against SQLite and PostgreSQL (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from app.db.clock import utcnow
from app.db.models import OfflineKitBuild
from app.domain import errors
from app.domain.verification import offline
from app.domain.verification.offline import OfflineKits, SignedKit
from app.server.context import ServiceContext
from crypto.offline import OfflineKit, verify_offline
from tests import factories
from tests.factories import problem

SICHUAN = "510000"


def worker(context: ServiceContext, **options: float) -> OfflineKits:
    """What one more worker process holds: its own kits object, the same database."""
    return OfflineKits(context.settings.status_list_ttl, context.settings.status_list_lifetime, **options)


async def stored(context: ServiceContext, region: str = SICHUAN) -> OfflineKitBuild:
    async with context.sessions() as session:
        row = await session.get(OfflineKitBuild, region)
        assert row is not None
        session.expunge(row)
        return row


async def fetch(context: ServiceContext, kits: OfflineKits, region: str = SICHUAN) -> SignedKit:
    async with context.sessions() as session:
        return await kits.kit(session, context.directory.keys, region)


async def due(context: ServiceContext, region: str = SICHUAN) -> None:
    async with context.sessions() as session:
        await worker(context).mark_due(session, region)


async def test_a_kit_built_by_one_worker_is_served_by_another_without_a_build(
    context: ServiceContext, admin_token: str
) -> None:
    await due(context)
    first = await fetch(context, worker(context))
    built = await stored(context)
    second = await fetch(context, worker(context))
    assert second == first
    assert (await stored(context)).generation == built.generation  # the second worker signed nothing
    assert built.document is not None and built.etag == first.etag
    kit = OfflineKit.from_json(built.document)
    assert kit.region == SICHUAN and built.entries >= 0 and built.build_ms >= 0


async def test_workers_asking_at_once_for_a_due_kit_cause_one_build(context: ServiceContext, admin_token: str) -> None:
    await fetch(context, worker(context))
    await due(context)
    previous = await stored(context)
    kits = await asyncio.gather(*(fetch(context, worker(context)) for _ in range(6)))
    now = await stored(context)
    assert now.generation == previous.generation + 1
    # Those that lost the race served the previous kit or the new one, never nothing.
    assert {kit.etag for kit in kits} <= {previous.etag, now.etag}
    assert now.etag in {kit.etag for kit in kits}


async def test_a_lease_held_elsewhere_means_the_stored_kit_is_served_until_it_lapses(
    context: ServiceContext, admin_token: str
) -> None:
    previous = await fetch(context, worker(context))
    await due(context)
    async with context.sessions() as session:  # another worker is building (or died while building)
        await session.execute(
            update(OfflineKitBuild)
            .where(OfflineKitBuild.region_code == SICHUAN)
            .values(lease_until=utcnow() + timedelta(seconds=60))
        )
        await session.commit()
    generation = (await stored(context)).generation
    assert (await fetch(context, worker(context))).etag == previous.etag
    assert (await stored(context)).generation == generation

    async with context.sessions() as session:  # its lease lapsed: the next asker builds
        await session.execute(
            update(OfflineKitBuild)
            .where(OfflineKitBuild.region_code == SICHUAN)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    await fetch(context, worker(context))
    row = await stored(context)
    assert row.generation == generation + 1 and row.lease_until is None


async def test_a_region_whose_first_build_is_in_flight_elsewhere_answers_503_after_waiting(
    context: ServiceContext, admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with context.sessions() as session:
        if await session.get(OfflineKitBuild, "440000") is None:
            session.add(OfflineKitBuild(region_code="440000"))
        await session.execute(
            update(OfflineKitBuild)
            .where(OfflineKitBuild.region_code == "440000")
            .values(etag=None, document=None, built_at=None, lease_until=utcnow() + timedelta(seconds=60))
        )
        await session.commit()
    monkeypatch.setattr(offline, "WAIT_FOR_FIRST_BUILD", 0.3)
    with pytest.raises(errors.Unavailable) as raised:
        await fetch(context, worker(context), "440000")
    assert raised.value.code == "unavailable" and raised.value.retry_after == 1
    async with context.sessions() as session:  # the builder is back: it finishes
        await session.execute(
            update(OfflineKitBuild).where(OfflineKitBuild.region_code == "440000").values(lease_until=None)
        )
        await session.commit()
    assert (await fetch(context, worker(context), "440000")).document["region"] == "440000"


async def test_the_kit_has_an_etag_and_if_none_match_answers_304(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    response = await client.get(f"/v1/offline-kits/{SICHUAN}")
    assert response.status_code == 200, response.text
    etag = response.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = await client.get(f"/v1/offline-kits/{SICHUAN}", headers={"if-none-match": etag})
    if again.headers["etag"] == etag:  # not rebuilt in between (it is every 30 s)
        assert again.status_code == 304 and again.content == b""
        assert "max-age" in again.headers["cache-control"]
    weak = await client.get(f"/v1/offline-kits/{SICHUAN}", headers={"if-none-match": f'"other", W/{etag}'})
    assert weak.status_code == (304 if weak.headers["etag"] == etag else 200)
    other = await client.get(f"/v1/offline-kits/{SICHUAN}", headers={"if-none-match": '"not-this-one"'})
    assert other.status_code == 200 and OfflineKit.from_json(other.content).region == SICHUAN


async def test_a_new_build_reaches_every_worker_and_names_no_card(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offline, "RECHECK_AFTER", 0.0)  # a worker asks the database again a second later
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    credential = (await factories.credentials(client, holder))[0]
    suspended = await factories.activated_holder(client, admin_token, SICHUAN)
    await factories.set_ecard_state(client, admin_token, suspended, "suspended")
    await due(context)
    builder, other = worker(context), worker(context)
    await fetch(context, builder)
    row = await stored(context)
    kit = OfflineKit.from_json(row.document or b"")
    # Not even the suspended eCard is in it: the token's list has no entries, and the build read none.
    assert (len(kit.status_list.status_list), row.entries) == (0, 0)
    assert verify_offline(credential, kit, int(utcnow().timestamp()), 5).accepted
    assert (await fetch(context, other)).etag == row.etag

    await due(context)
    await fetch(context, builder)
    rebuilt = await stored(context)
    assert rebuilt.generation == row.generation + 1
    assert (await fetch(context, other)).etag == rebuilt.etag


async def test_an_unknown_region_is_404_and_writes_nothing(context: ServiceContext, admin_token: str) -> None:
    with pytest.raises(errors.NotFound) as raised:
        await fetch(context, worker(context), "659999")
    assert raised.value.code == "not_found"
    async with context.sessions() as session:
        assert await session.scalar(select(OfflineKitBuild).where(OfflineKitBuild.region_code == "659999")) is None


async def test_unknown_region_over_http_is_a_problem(client: httpx.AsyncClient, admin_token: str) -> None:
    assert problem(await client.get("/v1/offline-kits/659999"), 404)["code"] == "not_found"

"""Refilling the status mirror from the database: complete, resumable, one at a time, and never over a newer change.

Each test fills a store of its own (its own key prefix on the real Redis) from the shared database, on
PostgreSQL and SQLite, so it can lose and refill it at will.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from sqlalchemy import func, select, update

from app.db.clock import utcnow
from app.db.models import ECard, Entitlement, MirrorRebuild
from app.domain.cards.rebuild import DatabaseFallback, MirrorRecovery, Progress, RebuildBusy, Rebuilder, store_epoch
from app.domain.cards.services import reconcile_status_mirror
from app.domain.verification.disclosure import PARK_ANNUAL_PASS, Profile, profile_field, unpack_profile
from app.server.context import ServiceContext
from app.settings import PROJECT_ROOT
from app.stores.status_mirror import CardRecord, MirroredStatus, MirrorEntry, RedisStatusMirror
from tests import factories

VENV_BIN = Path(sys.executable).parent


class Store:
    """A status store of the test's own: its prefix, the mirror, and a way to lose everything in it."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.prefix = prefix
        self.mirror = RedisStatusMirror.from_url(redis_url, prefix)
        self._client = redis.Redis.from_url(redis_url)

    async def lose_everything(self) -> None:
        """What a Redis restart without persistence does to this store."""
        keys = [key async for key in self._client.scan_iter(match=f"{self.prefix}*", count=1000)]
        if keys:
            await self._client.delete(*keys)

    async def close(self) -> None:
        """Delete its keys and close its connections."""
        await self.lose_everything()
        await self._client.aclose()
        await self.mirror.close()


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[Store]:
    """An empty store of this test alone."""
    own = Store(redis_url, f"{redis_prefix}rebuild-{uuid.uuid4().hex[:8]}:")
    yield own
    await own.close()


class FailingAfter(RedisStatusMirror):
    """The store, failing (like a crash) at the n-th bulk write, or running `before` ahead of a given one."""

    def __init__(self, store: Store, fail_at: int = 0, before: dict[int, object] | None = None) -> None:
        super().__init__(store.mirror.client, store.prefix)
        self.calls = 0
        self._fail_at = fail_at
        self._before = before or {}

    async def mirror_many(self, entries: Sequence[MirrorEntry]) -> int:
        """Count the call; fail or run the hook first when it is the chosen one."""
        self.calls += 1
        if self.calls == self._fail_at:
            raise RuntimeError("the rebuild's process died here")
        hook = self._before.get(self.calls)
        if hook is not None:
            await hook()  # type: ignore[operator]
        return await super().mirror_many(entries)


def open_profile(context: ServiceContext, card_ref: bytes, sealed: bytes) -> Profile:
    """A sealed profile opened as disclosure opens it."""
    return unpack_profile(context.pii.decrypt_bytes(sealed, profile_field(card_ref)))


async def ecard_count(context: ServiceContext) -> int:
    """How many eCards the shared database holds now."""
    async with context.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ECard)) or 0)


async def ecard_of(context: ServiceContext, holder: factories.Holder) -> ECard:
    """The holder's eCard row."""
    async with context.sessions() as session:
        ecard = await session.get(ECard, uuid.UUID(holder.ecard_id))
    assert ecard is not None
    return ecard


async def test_a_rebuild_fills_an_empty_store_with_every_ecard_its_profile_and_its_pass(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, store: Store
) -> None:
    active = await factories.activated_holder(client, admin_token, "510000")
    suspended = await factories.activated_holder(client, admin_token, "510000")
    await factories.set_ecard_state(client, admin_token, suspended, "suspended")
    pending = (await factories.issue_card(client, admin_token))["card"]
    async with context.sessions() as session:
        now = utcnow()
        session.add(Entitlement(
            ecard_id=uuid.UUID(active.ecard_id), kind=PARK_ANNUAL_PASS, region_code="510000",
            valid_from=now, valid_until=now + timedelta(days=30), created_at=now,
        ))  # fmt: skip
        # An eCard from before profiles were kept with it: the rebuild seals it on the way.
        await session.execute(update(ECard).where(ECard.id == uuid.UUID(active.ecard_id)).values(sealed_profile=None))
        await session.commit()
    # Issued eCards keep their sealed profile from the start; the rebuild reads it, never the person.
    issued = await ecard_of(context, suspended)
    assert issued.sealed_profile is not None
    assert open_profile(context, issued.card_ref, issued.sealed_profile).name == "张三"
    total = await ecard_count(context)
    seen: list[Progress] = []

    report = await Rebuilder(
        context.sessions, store.mirror, context.pii, store.prefix, page=3, on_progress=seen.append
    ).run()

    assert (report.cards, report.written, report.resumed_from) == (total, total, 0)
    assert report.profiles_sealed >= 1
    assert seen[-1].done == total and seen[-1].eta == 0
    rows = [await ecard_of(context, active), await ecard_of(context, suspended)]
    pending_row = await ecard_of(context, factories.Holder(pending["card_id"], pending["ecard_id"], "", "", ""))
    refs = [row.card_ref for row in rows] + [pending_row.card_ref]
    assert await store.mirror.get_statuses(refs) == ["A", "S", "P"]
    sealed = await store.mirror.get_record(refs[0], CardRecord.PROFILE)
    assert sealed is not None and rows[0].sealed_profile == sealed  # kept in the database too
    profile = open_profile(context, refs[0], sealed)
    assert (profile.name, profile.insured_region) == ("张三", "510000")
    passes = await store.mirror.get_record(refs[0], CardRecord.ENTITLEMENTS)
    assert passes is not None and b"510000" in passes
    assert await store.mirror.get_record(refs[1], CardRecord.ENTITLEMENTS) is None
    async with context.sessions() as session:
        clean = await reconcile_status_mirror(session, store.mirror, context.pii, repair=False, batch=4)
        state = await session.get(MirrorRebuild, store.prefix)
    assert (clean.checked, clean.missing, clean.different, clean.profiles_missing) == (total, 0, 0, 0)
    assert state is not None and state.finished_at is not None and state.holder is None
    assert state.filled_epoch_ms == await store_epoch(store.mirror)
    assert not await store.mirror.refilling()


async def test_a_rebuild_that_died_goes_on_after_its_checkpoint(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, store: Store
) -> None:
    for _ in range(4):
        await factories.activated_holder(client, admin_token, "510000")
    total = await ecard_count(context)
    page = max(total // 4, 1)
    dying = FailingAfter(store, fail_at=3)
    with pytest.raises(RuntimeError):
        await Rebuilder(context.sessions, dying, context.pii, store.prefix, page=page, in_flight=1).run()
    async with context.sessions() as session:
        state = await session.get(MirrorRebuild, store.prefix)
    assert state is not None and state.cards_done == 2 * page and state.finished_at is None
    assert state.holder is None  # released on the way out
    assert await store.mirror.refilling()  # the flag stays up until its TTL: the refill is not done

    calls = FailingAfter(store)
    report = await Rebuilder(context.sessions, calls, context.pii, store.prefix, page=page, in_flight=1).run()

    assert report.resumed_from == 2 * page and report.cards == total
    assert report.written == total - 2 * page
    assert calls.calls == -(-(total - 2 * page) // page)  # only the pages after the checkpoint
    async with context.sessions() as session:
        clean = await reconcile_status_mirror(session, store.mirror, context.pii, repair=False)
    assert (clean.missing, clean.different) == (0, 0)
    # A restart asked for starts from the first eCard.
    again = await Rebuilder(context.sessions, store.mirror, context.pii, store.prefix, page=page).run(restart=True)
    assert again.resumed_from == 0 and again.cards == total and again.written == total


async def test_a_change_committed_during_the_rebuild_wins(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, store: Store
) -> None:
    holder = await factories.activated_holder(client, admin_token, "510000")
    row = await ecard_of(context, holder)

    async def suspend_meanwhile() -> None:
        # Committed after the rebuild read the card (active), and published before its write lands.
        async with context.sessions() as session:
            await session.execute(
                update(ECard).where(ECard.id == row.id).values(state="suspended", mirror_version=row.mirror_version + 1)
            )
            await session.commit()
        await store.mirror.mirror_card(row.card_ref, row.mirror_version + 1, MirroredStatus.SUSPENDED, {})

    total = await ecard_count(context)
    racing = FailingAfter(store, before={1: suspend_meanwhile})
    report = await Rebuilder(context.sessions, racing, context.pii, store.prefix, page=total).run()

    assert (report.cards, report.written) == (total, total - 1)
    assert await store.mirror.get_statuses([row.card_ref]) == ["S"]
    async with context.sessions() as session:
        clean = await reconcile_status_mirror(session, store.mirror, context.pii, repair=False)
        await session.execute(
            update(ECard).where(ECard.id == row.id).values(state="active", mirror_version=row.mirror_version + 2)
        )
        await session.commit()
    assert clean.different == 0


async def test_one_rebuild_at_a_time_and_a_dead_holders_lease_is_taken_over(
    context: ServiceContext, store: Store
) -> None:
    first = Rebuilder(context.sessions, store.mirror, context.pii, store.prefix)
    await first._take_lease()
    with pytest.raises(RebuildBusy):
        await Rebuilder(context.sessions, store.mirror, context.pii, store.prefix).run()
    async with context.sessions() as session:
        await session.execute(
            update(MirrorRebuild)
            .where(MirrorRebuild.prefix == store.prefix)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    report = await Rebuilder(context.sessions, store.mirror, context.pii, store.prefix).run()
    assert report.cards == await ecard_count(context)


async def test_workers_notice_a_lost_store_and_exactly_one_refills_it(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, store: Store
) -> None:
    holder = await factories.activated_holder(client, admin_token, "510000")
    ref = (await ecard_of(context, holder)).card_ref
    workers = [MirrorRecovery(context.sessions, store.mirror, context.pii, store.prefix) for _ in range(3)]
    # The first look at a store takes what it holds as filled; nothing is lost yet.
    assert [await worker.check() for worker in workers] == [None, None, None]
    assert await store.mirror.get_statuses([ref]) == [None]

    await store.lose_everything()
    reports = await asyncio.gather(*(worker.check() for worker in workers))

    done = [report for report in reports if report is not None]
    assert len(done) == 1 and done[0].cards == await ecard_count(context)
    assert sum(worker.rebuilds for worker in workers) == 1
    assert await store.mirror.get_statuses([ref]) == ["A"]
    assert not await store.mirror.refilling()
    assert [await worker.check() for worker in workers] == [None, None, None]


async def test_a_store_lost_again_during_the_rebuild_is_filled_from_the_start(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, store: Store
) -> None:
    for _ in range(3):
        await factories.activated_holder(client, admin_token, "510000")
    total = await ecard_count(context)
    page = max(total // 3, 1)
    losing = FailingAfter(store, before={3: store.lose_everything})
    report = await Rebuilder(context.sessions, losing, context.pii, store.prefix, page=page, in_flight=1).run()
    assert report.cards == total
    async with context.sessions() as session:
        clean = await reconcile_status_mirror(session, store.mirror, context.pii, repair=False)
    assert (clean.checked, clean.missing, clean.different) == (total, 0, 0)


async def test_the_database_fallback_mirrors_a_card_only_while_refilling_and_within_its_rate(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, store: Store
) -> None:
    holders = [await factories.activated_holder(client, admin_token, "510000") for _ in range(2)]
    rows = [await ecard_of(context, holder) for holder in holders]
    fallback = DatabaseFallback(context.sessions, store.mirror, context.pii, rate=1)
    assert not await fallback.mirror_missing(rows[0].card_ref)  # not refilling: card_unknown stays
    await store.mirror.set_refilling(True, 30)
    fallback = DatabaseFallback(context.sessions, store.mirror, context.pii, rate=1)
    assert await fallback.mirror_missing(rows[0].card_ref)
    assert not await fallback.mirror_missing(rows[1].card_ref)  # over the rate (one a second)
    assert (fallback.mirrored, fallback.over_rate) == (1, 1)
    assert await store.mirror.get_statuses([row.card_ref for row in rows]) == ["A", None]
    assert await store.mirror.get_record(rows[0].card_ref, CardRecord.PROFILE) == rows[0].sealed_profile
    generous = DatabaseFallback(context.sessions, store.mirror, context.pii, rate=100)
    assert not await generous.mirror_missing(bytes(16))  # no such card
    assert not await DatabaseFallback(context.sessions, store.mirror, context.pii, rate=0).mirror_missing(
        rows[1].card_ref
    )


async def test_the_cli_rebuilds_with_progress_and_reconcile_keeps_its_report(
    context: ServiceContext, store: Store, database_url: str, redis_url: str
) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "ECARD_REDIS_PREFIX": store.prefix}
    total = await ecard_count(context)

    def ecard(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(VENV_BIN / "litestar"), "--app", "app.asgi:create_app", "ecard", "status", *args]
        return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)

    before = await asyncio.to_thread(ecard, "reconcile")
    assert before.returncode == 0, before.stderr
    assert before.stdout.strip() == (
        f"{total} eCards checked: {total} missing from the mirror, 0 different, {total} without their profile, "
        "0 repaired"
    )
    rebuilt = await asyncio.to_thread(ecard, "rebuild", "--page", "2")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.startswith(f"{total} eCards in the mirror: {total} written, 0 already newer there")
    assert f"rebuild: {total:,} of ~{total:,} eCards" in rebuilt.stderr and "ETA" in rebuilt.stderr
    after = await asyncio.to_thread(ecard, "reconcile", "--repair", "--quiet")
    assert after.stdout.strip() == (
        f"{total} eCards checked: 0 missing from the mirror, 0 different, 0 without their profile, 0 repaired"
    )
    # While another process holds the lease, the command says so and changes nothing.
    holder = Rebuilder(context.sessions, store.mirror, context.pii, store.prefix)
    await holder._take_lease()
    busy = await asyncio.to_thread(ecard, "rebuild")
    assert busy.returncode == 1 and "another process is rebuilding" in busy.stderr

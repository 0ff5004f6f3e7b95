"""Reconciliation of the database with the Redis status mirror."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as redis

from app.context import ServiceContext
from app.domain.cards.services import reconcile_status_mirror
from app.stores.status_mirror import MirroredStatus, RedisStatusMirror, StoreUnavailable
from crypto.credential import open_credential
from tests import factories
from tests.factories import Gate
from tests.servers import RedisServer


async def test_drift_is_reported_then_repaired(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, gate: Gate, redis_url: str
) -> None:
    suspended_in_redis = await factories.activated_holder(client, admin_token, "510000")
    wiped_from_redis = await factories.activated_holder(client, admin_token, "510000")
    keys = context.directory.keys.verify_keys
    refs = []
    for holder in (suspended_in_redis, wiped_from_redis):
        [credential] = await factories.credentials(client, holder)
        refs.append(open_credential(credential, keys).claims.card_ref)
    await context.mirror.set_status(refs[0], MirroredStatus.SUSPENDED)
    direct = redis.Redis.from_url(redis_url)
    await direct.delete(f"{context.settings.redis_prefix}{{{refs[1].hex()}}}:s")
    await direct.aclose()

    async with context.sessions() as session:
        report = await reconcile_status_mirror(session, context.mirror, repair=False, batch=7)
    assert report.missing >= 1 and report.different >= 1 and report.repaired == 0
    assert report.checked >= 2
    assert await context.mirror.get_statuses(refs) == [MirroredStatus.SUSPENDED.value, None]

    async with context.sessions() as session:
        repaired = await reconcile_status_mirror(session, context.mirror, repair=True, batch=7)
    assert repaired.repaired == repaired.missing + repaired.different >= 2
    assert await context.mirror.get_statuses(refs) == [MirroredStatus.ACTIVE.value] * 2

    async with context.sessions() as session:
        clean = await reconcile_status_mirror(session, context.mirror, repair=False)
    assert (clean.missing, clean.different) == (0, 0)
    [credential] = await factories.credentials(client, wiped_from_redis)
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


@pytest.fixture
async def own_mirror() -> AsyncIterator[tuple[RedisStatusMirror, redis.Redis]]:
    """A status mirror on a Redis server of this test alone (its scripts can be flushed)."""
    server = RedisServer().start()
    mirror = RedisStatusMirror.from_url(server.url, "t:")
    direct = redis.Redis.from_url(server.url)
    yield mirror, direct
    await direct.aclose()
    await mirror.close()
    server.stop()


async def test_concurrent_presentations_share_a_pipeline_and_stay_single_use(
    own_mirror: tuple[RedisStatusMirror, redis.Redis],
) -> None:
    mirror, direct = own_mirror
    cards = [os.urandom(16) for _ in range(5)]
    for card in cards:
        await mirror.set_status(card, MirroredStatus.ACTIVE)
    nonce = os.urandom(12)
    # The server has never seen the script (NOSCRIPT on the first pipeline), then loses it again.
    for _round in range(2):
        copies = [mirror.present(card, nonce, 60) for card in cards for _ in range(30)]
        results = await asyncio.gather(*copies)
        firsts = [first for first, _status in results]
        assert sum(firsts) == len(cards), "exactly one first use per card"
        assert {status for _first, status in results} == {MirroredStatus.ACTIVE.value}
        await direct.script_flush()
        nonce = os.urandom(12)
    ttl = await direct.ttl(f"t:{{{cards[0].hex()}}}:n:{nonce.hex()}")
    assert ttl == -2  # the last nonce was never presented


async def test_store_outage_fails_every_waiting_presentation(
    own_mirror: tuple[RedisStatusMirror, redis.Redis],
) -> None:
    mirror, direct = own_mirror
    await direct.shutdown(nosave=True)  # type: ignore[no-untyped-call]
    results = await asyncio.gather(
        *(mirror.present(os.urandom(16), os.urandom(12), 60) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(result, StoreUnavailable) for result in results)

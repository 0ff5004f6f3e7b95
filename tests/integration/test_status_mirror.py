"""Reconciliation of the database with the Redis status mirror."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as redis

from app.context import ServiceContext
from app.domain.cards.services import reconcile_status_mirror
from app.stores.status_mirror import MirroredStatus, RateLimit, RedisStatusMirror, Scan, ScanResult, StoreUnavailable
from crypto.credential import NONCE_LENGTH, open_credential
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
        report = await reconcile_status_mirror(session, context.mirror, context.pii, repair=False, batch=7)
    assert report.missing >= 1 and report.different >= 1 and report.repaired == 0
    assert report.checked >= 2
    assert await context.mirror.get_statuses(refs) == [MirroredStatus.SUSPENDED.value, None]

    async with context.sessions() as session:
        repaired = await reconcile_status_mirror(session, context.mirror, context.pii, repair=True, batch=7)
    # Cards whose only drift was a missing disclosure profile are repaired too.
    assert repaired.repaired >= repaired.missing + repaired.different >= 2
    assert await context.mirror.get_statuses(refs) == [MirroredStatus.ACTIVE.value] * 2

    async with context.sessions() as session:
        clean = await reconcile_status_mirror(session, context.mirror, context.pii, repair=False)
    assert (clean.missing, clean.different, clean.profiles_missing, clean.repaired) == (0, 0, 0, 0)
    [credential] = await factories.credentials(client, wiped_from_redis)
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


def scan(card_ref: bytes, nonce: bytes, terminal: str) -> Scan:
    """A scan of card_ref's credential with nonce, by terminal, well within its rate."""
    return Scan(
        terminal=terminal,
        verification_id="vf_" + os.urandom(6).hex(),
        rate=RateLimit(per_minute=60_000, burst=100),
        now_ms=time.time_ns() // 1_000_000,
        event=b"event",
        card_ref=card_ref,
        nonce=nonce,
        nonce_ttl=60,
        retry_window_ms=10_000,
    )


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
    nonce = os.urandom(NONCE_LENGTH)
    # The server has never seen the script (NOSCRIPT on the first pipeline), then loses it again.
    for _round in range(2):
        copies = [mirror.scan(scan(card, nonce, f"gate-{i}")) for card in cards for i in range(30)]
        answers = await asyncio.gather(*copies)
        accepted = [answer for answer in answers if answer.result == ScanResult.ACCEPTED]
        assert len(accepted) == len(cards), "exactly one first use per card"
        assert {answer.result for answer in answers} == {ScanResult.ACCEPTED, ScanResult.REPLAYED}
        assert {answer.kind for answer in answers} == {"new"}
        await direct.script_flush()
        nonce = os.urandom(NONCE_LENGTH)
    ttl = await direct.ttl(f"t:{{{cards[0].hex()}}}:n:{nonce.hex()}")
    assert ttl == -2  # the last nonce was never presented


async def test_store_outage_fails_every_waiting_presentation(
    own_mirror: tuple[RedisStatusMirror, redis.Redis],
) -> None:
    mirror, direct = own_mirror
    await direct.shutdown(nosave=True)  # type: ignore[no-untyped-call]
    results = await asyncio.gather(
        *(mirror.scan(scan(os.urandom(16), os.urandom(NONCE_LENGTH), "gate")) for _ in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(result, StoreUnavailable) for result in results)

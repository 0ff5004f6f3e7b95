"""Reconciliation of the database with the Redis status mirror."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
import redis.asyncio as redis
from redis.crc import key_slot

from app.domain.cards.services import reconcile_status_mirror
from app.domain.verification.disclosure import Profile, seal_profile
from app.security.pii import PiiCipher
from app.server.context import ServiceContext
from app.stores.event_stream import EVENT_SHARDS, shard_of, shard_prefix
from app.stores.status_mirror import (
    CARDS_PER_BUCKET,
    CardRecord,
    MemoryStatusMirror,
    MirroredStatus,
    MirrorEntry,
    MirrorLayout,
    RateLimit,
    RedisStatusMirror,
    Scan,
    ScanResult,
    StatusMirror,
    StoreUnavailable,
    card_key,
    card_value,
    profile_part,
    status_letter,
)
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
        refs.append(open_credential(credential, keys, context.directory.keys.seals).claims.card_ref)
    await context.mirror.set_status(refs[0], MirroredStatus.SUSPENDED)
    direct = redis.Redis.from_url(redis_url)
    assert isinstance(context.mirror, RedisStatusMirror)
    assert await direct.hdel(*context.mirror.layout.place(context.settings.redis_prefix, refs[1])) == 1
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
    ttl = await direct.ttl(f"{card_key('t:', cards[0])}:n:{nonce.hex()}")
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


@pytest.fixture(params=["redis", "cluster", "memory"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[StatusMirror]:
    """Both implementations of the store, the Lua script on one node and on a three-master cluster, and its
    in-process twin: they must agree."""
    if request.param == "memory":
        yield MemoryStatusMirror()
        return
    prefix = f"store-test-{os.urandom(4).hex()}:"
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        mirror = RedisStatusMirror.from_url(cluster.url, prefix, cluster=True)
        yield mirror  # the cluster is this run's own and goes with it
        await mirror.close()
        return
    mirror = RedisStatusMirror.from_url(redis_url, prefix)
    yield mirror
    keys = [key async for key in mirror.client.scan_iter(match=f"{prefix}*")]
    if keys:
        await mirror.client.delete(*keys)
    await mirror.close()


def card_scan(card_ref: bytes, nonce: bytes, terminal: str, *, now_ms: int, **changes: object) -> Scan:
    """A scan of card_ref's credential at now_ms (rate: 60 per minute, bursts of 3)."""
    return replace(scan(card_ref, nonce, terminal), rate=RateLimit(60, 3), now_ms=now_ms, **changes)  # type: ignore[arg-type]


async def test_rate_limit_is_exact_at_the_boundary_and_consumes_nothing(store: StatusMirror) -> None:
    card = os.urandom(16)
    await store.set_status(card, MirroredStatus.ACTIVE)
    now = time.time_ns() // 1_000_000
    nonces = [os.urandom(NONCE_LENGTH) for _ in range(5)]
    answers = [await store.scan(card_scan(card, nonce, "gate", now_ms=now)) for nonce in nonces]
    assert [answer.kind for answer in answers] == ["new", "new", "new", "limited", "limited"]
    assert answers[3].retry_after_ms == 1000  # one interval at 60 per minute
    # The refused credential was not used up: a second later one slot is free again, and it passes.
    later = await store.scan(card_scan(card, nonces[3], "gate", now_ms=now + 1000))
    assert (later.kind, later.result) == ("new", ScanResult.ACCEPTED)
    assert (await store.scan(card_scan(card, nonces[4], "gate", now_ms=now + 1000))).kind == "limited"
    # Another terminal has a budget of its own, and so has another scope of the same terminal.
    assert (await store.scan(card_scan(card, nonces[4], "other", now_ms=now + 1000))).kind == "new"
    assert (await store.scan(card_scan(card, os.urandom(7), "gate", now_ms=now + 1000, rate_scope=":b"))).kind == "new"


async def test_retry_within_the_window_repeats_the_first_answer(store: StatusMirror) -> None:
    card, nonce = os.urandom(16), os.urandom(NONCE_LENGTH)
    await store.set_status(card, MirroredStatus.ACTIVE)
    await store.set_record(card, CardRecord.PROFILE, b"sealed profile")
    now = time.time_ns() // 1_000_000
    first = await store.scan(card_scan(card, nonce, "gate", now_ms=now, record=CardRecord.PROFILE))
    assert (first.kind, first.result, first.record) == ("new", ScanResult.ACCEPTED, b"sealed profile")
    retry = await store.scan(
        card_scan(card, nonce, "gate", now_ms=now + 10_000, verification_id="vf_other", record=CardRecord.PROFILE)
    )
    assert (retry.kind, retry.result, retry.verification_id) == ("retry", "accepted", first.verification_id)
    assert retry.first_used_ms == now and retry.record == b"sealed profile"
    late = await store.scan(card_scan(card, nonce, "gate", now_ms=now + 10_001))
    assert (late.kind, late.result, late.first_used_ms) == ("new", ScanResult.REPLAYED, now)
    elsewhere = await store.scan(card_scan(card, nonce, "other", now_ms=now + 1))
    assert (elsewhere.result, elsewhere.record) == (ScanResult.REPLAYED, None)


async def test_statuses_decided_results_and_a_missing_profile(store: StatusMirror) -> None:
    now = time.time_ns() // 1_000_000
    for status, expected in [
        (MirroredStatus.SUSPENDED, ScanResult.CARD_SUSPENDED),
        (MirroredStatus.PENDING_ACTIVATION, ScanResult.CARD_SUSPENDED),
        (MirroredStatus.REVOKED, ScanResult.CARD_REVOKED),
        (None, ScanResult.CARD_UNKNOWN),
    ]:
        card = os.urandom(16)
        if status is not None:
            await store.set_status(card, status)
        answer = await store.scan(card_scan(card, os.urandom(NONCE_LENGTH), f"gate-{expected}", now_ms=now))
        assert answer.result == expected
    # An active card without the profile a hospital needs fails closed; entitlements are optional.
    card = os.urandom(16)
    await store.set_status(card, MirroredStatus.ACTIVE)
    hospital = await store.scan(card_scan(card, os.urandom(NONCE_LENGTH), "h", now_ms=now, record=CardRecord.PROFILE))
    assert hospital.result == ScanResult.CARD_UNKNOWN
    park = await store.scan(card_scan(card, os.urandom(NONCE_LENGTH), "p", now_ms=now, record=CardRecord.ENTITLEMENTS))
    assert (park.result, park.record) == (ScanResult.ACCEPTED, None)
    # A result decided before the store touches neither nonce nor card, only the rate and the log.
    decided = await store.scan(card_scan(b"", b"", "gate", now_ms=now, decided="bad_signature"))
    assert (decided.kind, decided.result) == ("new", "bad_signature")


async def test_bulk_writes_keep_versions_and_records(store: StatusMirror) -> None:
    cards = [os.urandom(16) for _ in range(5)]
    await store.mirror_card(cards[0], 9, MirroredStatus.SUSPENDED, {CardRecord.PROFILE: b"newer"})
    entries = [MirrorEntry(card, 3, MirroredStatus.ACTIVE, b"p" + card, None) for card in cards]
    # The card the store holds at a newer version keeps it; the four others are written.
    assert await store.mirror_many(entries) == 4
    assert await store.get_statuses(cards) == ["S"] + ["A"] * 4
    assert await store.get_record(cards[0], CardRecord.PROFILE) == b"newer"
    assert await store.get_record(cards[1], CardRecord.PROFILE) == b"p" + cards[1]
    assert await store.missing_records(cards, CardRecord.ENTITLEMENTS) == [True] * 5
    assert await store.mirror_many([]) == 0


async def test_a_bulk_write_replaces_each_card_whole(store: StatusMirror) -> None:
    """What a card lacks in the database it loses in the store (a rebuild or a repair sets the truth)."""
    card, other = os.urandom(16), os.urandom(16)
    records = {CardRecord.PROFILE: b"old profile", CardRecord.ENTITLEMENTS: b"old pass"}
    await store.mirror_card(card, 2, MirroredStatus.ACTIVE, records)
    await store.mirror_card(other, 2, MirroredStatus.ACTIVE, records)
    entries = [
        MirrorEntry(card, 2, MirroredStatus.SUSPENDED, None, None),  # the same version is written again
        MirrorEntry(other, 3, MirroredStatus.ACTIVE, b"new profile", b"new pass"),
    ]
    assert await store.mirror_many(entries) == 2
    assert await store.get_statuses([card, other]) == ["S", "A"]
    assert await store.missing_records([card, other], CardRecord.PROFILE) == [True, False]
    assert await store.missing_records([card, other], CardRecord.ENTITLEMENTS) == [True, False]
    assert await store.get_record(other, CardRecord.PROFILE) == b"new profile"
    assert await store.get_record(other, CardRecord.ENTITLEMENTS) == b"new pass"
    # Its status and version stay the card's own: a later single write of an older version is refused.
    assert not await store.mirror_card(other, 2, MirroredStatus.REVOKED, {})
    assert await store.get_statuses([other]) == ["A"]


async def test_refilling_flag_and_reopening_a_card_unknown_scan(store: StatusMirror) -> None:
    assert not await store.refilling()
    await store.set_refilling(True, ttl=30)
    assert await store.refilling()
    await store.set_refilling(False)
    assert not await store.refilling()

    now = time.time_ns() // 1_000_000
    card, nonce = os.urandom(16), os.urandom(NONCE_LENGTH)
    unknown = card_scan(card, nonce, "gate", now_ms=now)
    assert (await store.scan(unknown)).result == ScanResult.CARD_UNKNOWN
    # Another scan's use is not forgotten, nor is an answer other than card_unknown.
    assert not await store.reopen(replace(unknown, verification_id="vf_someone_else"))
    assert await store.reopen(unknown)
    await store.mirror_card(card, 1, MirroredStatus.ACTIVE, {})
    again = await store.scan(replace(unknown, now_ms=now + 1))
    assert (again.kind, again.result) == ("new", ScanResult.ACCEPTED)
    assert not await store.reopen(unknown)
    assert (await store.scan(card_scan(card, nonce, "other", now_ms=now + 2))).result == ScanResult.REPLAYED


async def test_status_and_profile_writes_keep_each_other(store: StatusMirror) -> None:
    card, now = os.urandom(16), time.time_ns() // 1_000_000
    # Dots and zero bytes: the card's value separates status and profile with a ".", which must not confuse it.
    profile = b".sealed\x00.profile."
    await store.set_record(card, CardRecord.PROFILE, profile)
    assert await store.get_statuses([card]) == [None]
    assert (await store.holder_state(card, uuid.uuid4())).status is None
    assert (
        await store.get_record(card, CardRecord.PROFILE),
        await store.missing_records([card], CardRecord.PROFILE),
    ) == (
        profile,
        [False],
    )
    hospital = card_scan(card, os.urandom(NONCE_LENGTH), "h", now_ms=now, record=CardRecord.PROFILE)
    assert (await store.scan(hospital)).result == ScanResult.CARD_UNKNOWN
    # A versioned write without the record keeps it; a record written alone keeps the status and version.
    assert await store.mirror_card(card, 7, MirroredStatus.ACTIVE, {})
    await store.set_record(card, CardRecord.ENTITLEMENTS, b"{}")
    assert not await store.mirror_card(card, 6, MirroredStatus.REVOKED, {CardRecord.PROFILE: None})
    accepted = await store.scan(replace(hospital, nonce=os.urandom(NONCE_LENGTH)))
    assert (accepted.result, accepted.record) == (ScanResult.ACCEPTED, profile)
    assert (await store.holder_state(card, uuid.uuid4())).status == MirroredStatus.ACTIVE.value
    park = await store.scan(card_scan(card, os.urandom(NONCE_LENGTH), "p", now_ms=now, record=CardRecord.ENTITLEMENTS))
    assert (park.result, park.record) == (ScanResult.ACCEPTED, b"{}")
    # An unversioned status keeps the profile; dropping the profile keeps the status.
    await store.set_status(card, MirroredStatus.SUSPENDED)
    assert await store.get_record(card, CardRecord.PROFILE) == profile
    await store.set_record(card, CardRecord.PROFILE, None)
    assert await store.get_statuses([card]) == [MirroredStatus.SUSPENDED.value]
    assert await store.missing_records([card], CardRecord.PROFILE) == [True]
    assert await store.get_record(card, CardRecord.ENTITLEMENTS) == b"{}"
    # A card with neither status nor profile is gone.
    other = os.urandom(16)
    await store.set_record(other, CardRecord.PROFILE, b"p")
    await store.set_record(other, CardRecord.PROFILE, None)
    assert (await store.get_statuses([other]), await store.get_record(other, CardRecord.PROFILE)) == ([None], None)


async def test_bulk_writes_of_many_shards_guard_each_card(store: StatusMirror) -> None:
    cards = [os.urandom(16) for _ in range(2500)]  # more than a pipeline's MIRROR_BATCH, every shard
    newer = cards[::7]
    for card in newer:
        await store.mirror_card(card, 5, MirroredStatus.REVOKED, {})
    entries = [MirrorEntry(card, 4, MirroredStatus.ACTIVE, card[::-1], None) for card in cards]
    assert await store.mirror_many(entries) == len(cards) - len(newer)
    statuses = await store.get_statuses(cards)
    assert statuses == ["R" if index % 7 == 0 else "A" for index in range(len(cards))]
    assert await store.missing_records(cards, CardRecord.PROFILE) == [index % 7 == 0 for index in range(len(cards))]
    assert await store.get_record(cards[1], CardRecord.PROFILE) == cards[1][::-1]


def test_a_card_value_built_for_a_bulk_write_reads_back_as_the_scripts_write_it() -> None:
    """`mirror_many` builds values in Python that `_MIRROR_LUA` builds in Lua: one format, read by one parser."""
    assert card_value(MirroredStatus.SUSPENDED, 17, b"sealed.with.dots") == b"S17.sealed.with.dots"
    assert profile_part(card_value(MirroredStatus.ACTIVE, 3, b"sealed.with.dots")) == b"sealed.with.dots"
    assert card_value(MirroredStatus.REVOKED, 123_456, None) == b"R123456"
    assert profile_part(card_value(MirroredStatus.REVOKED, 123_456, b"")) is None
    assert status_letter(card_value(MirroredStatus.PENDING_ACTIVATION, 1, None).decode()) == "P"


def test_buckets_hold_32_to_64_cards_at_the_capacity_they_were_sized_for() -> None:
    for capacity in (10_000, 65_536, 1_000_000, 10_000_000, 90_000_000, 100_000_000):
        per_bucket = capacity / (EVENT_SHARDS * 2 ** MirrorLayout.for_capacity(capacity).bits)
        assert CARDS_PER_BUCKET / 2 < per_bucket <= CARDS_PER_BUCKET, capacity
    assert MirrorLayout.for_capacity(100).bits == 0


def test_bulk_writes_place_every_card_where_the_layout_says() -> None:
    """`placer` is `place` computed ahead for bulk writes: any difference would write a card where no scan looks."""
    cards = [os.urandom(16) for _ in range(2000)] + [bytes(16), b"\xff" * 16, b"", b"\x01", os.urandom(5)]
    for capacity in (100, 20_000, 3_000_000, 90_000_000, 2**40):
        layout = MirrorLayout.for_capacity(capacity)
        place = layout.placer("t:")
        for card in cards:
            assert place(card) == (shard_prefix("t:", shard_of(card)), *layout.place("t:", card)), (capacity, card)


async def test_cards_live_in_listpack_buckets_of_their_shard() -> None:
    """The layout the memory figure rests on: few keys, each a compact listpack, in the card's slot."""
    server = RedisServer().start()
    mirror = RedisStatusMirror.from_url(server.url, "t:", capacity=20_000)
    direct = redis.Redis.from_url(server.url)
    try:
        pii = PiiCipher(os.urandom(32), os.urandom(32))
        cards = [os.urandom(16) for _ in range(20_000)]
        entries = [
            MirrorEntry(
                card,
                123_456,
                MirroredStatus.ACTIVE,
                seal_profile(pii, card, Profile("欧阳娜娜", "5101**********123X", "510000")),
                None,
            )
            for card in cards
        ]
        assert await mirror.mirror_many(entries) == len(cards)
        keys = [key async for key in direct.scan_iter(match="t:*", count=1000)]
        assert len(keys) == EVENT_SHARDS * 2**mirror.layout.bits == 512
        assert {await direct.object("encoding", key) for key in keys} == {b"listpack"}
        card = cards[0]
        bucket, field = mirror.layout.place("t:", card)
        assert key_slot(bucket.encode()) == key_slot(f"{card_key('t:', card)}:n:00".encode())
        assert field == card[mirror.layout.bits // 8 :] and (await direct.hget(bucket, field) or b"").startswith(
            b"A123456."
        )
        answer = await mirror.scan(replace(scan(card, os.urandom(NONCE_LENGTH), "h"), record=CardRecord.PROFILE))
        assert answer.result == ScanResult.ACCEPTED and answer.record == entries[0].profile
    finally:
        await direct.aclose()
        await mirror.close()
        server.stop()


async def test_a_refused_bulk_write_fails_whole_and_leaves_no_reply_behind(
    own_mirror: tuple[RedisStatusMirror, redis.Redis],
) -> None:
    """A bulk write's replies are read off a pooled connection: one refused must not leave the others there."""
    mirror, direct = own_mirror
    cards = [os.urandom(16) for _ in range(300)]
    entries = [MirrorEntry(card, 1, MirroredStatus.ACTIVE, card, None) for card in cards]
    await direct.config_set("maxmemory", 1)  # every write refused (out of memory), so every shard's call fails
    with pytest.raises(StoreUnavailable):
        await mirror.mirror_many(entries)
    # The client gave up at the first refusal; Redis still runs the rest of what it was sent (a call per
    # shard). Memory is given back only once it has refused them all, or a late call would be accepted.
    sent = len({shard_of(card) for card in cards})
    for _ in range(200):
        stats = (await direct.info("commandstats")).get("cmdstat_evalsha", {})
        if stats.get("calls", 0) + stats.get("rejected_calls", 0) >= sent:
            break
        await asyncio.sleep(0.01)
    await direct.config_set("maxmemory", 0)
    assert await mirror.get_statuses(cards) == [None] * len(cards)
    assert await mirror.mirror_many(entries) == len(cards)
    assert await mirror.get_statuses(cards) == ["A"] * len(cards)
    assert await mirror.get_record(cards[0], CardRecord.PROFILE) == cards[0]

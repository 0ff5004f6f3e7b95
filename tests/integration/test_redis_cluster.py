"""The service on a three-master Redis Cluster (loadtests/redis_cluster.py starts it on loopback).

Nonces, statuses, records and the shards' event streams share slots per card shard, so a scan
is one atomic script call in one slot; the terminal's rate is taken by a call of its own first.
The status-mirror contract tests run on the cluster too (tests/integration/test_status_mirror.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx
import redis
import redis.asyncio as async_redis
from litestar import Litestar
from sqlalchemy import select

from app.asgi import create_app
from app.db.models import VerificationEvent
from app.domain.operators.services import Role
from app.server.context import STATE_KEY, ServiceContext
from app.stores.event_stream import EVENT_SHARDS, SHARD_TAGS, Backlog, stream_keys
from app.stores.status_mirror import MirroredStatus, RedisStatusMirror, ScanResult
from crypto.credential import NONCE_LENGTH
from loadtests.redis_cluster import RedisCluster
from tests import factories
from tests.conftest import make_settings, operator_token, serve
from tests.factories import bearer
from tests.integration.test_status_mirror import scan

DRAIN_DEADLINE = 15.0


def test_each_master_holds_a_fair_share_of_the_shards(redis_cluster: RedisCluster) -> None:
    client = redis.RedisCluster.from_url(redis_cluster.url)
    try:
        span = 16384 // EVENT_SHARDS
        assert [redis.crc.key_slot(tag.encode()) // span for tag in SHARD_TAGS] == list(range(EVENT_SHARDS))
        owners = Counter(client.get_node_from_key(f"{{{tag}}}").name for tag in SHARD_TAGS)
        assert len(owners) == 3 and min(owners.values()) >= EVENT_SHARDS // 3, owners
    finally:
        client.close()


async def test_the_service_on_a_cluster(database_url: str, redis_cluster: RedisCluster) -> None:
    prefix = f"cluster-{uuid.uuid4().hex[:8]}:"
    settings = make_settings(database_url, redis_cluster.url, prefix, redis_cluster=True, drain_events=True)
    app: Litestar = create_app(settings)
    async with serve(app) as client:
        context: ServiceContext = app.state[STATE_KEY]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        await client.post("/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token))
        gate = await factories.new_gate(client, token, "510000", "transit", ["transit"])
        other = await factories.new_terminal(client, token, gate.organisation_id, ["transit"])
        slow = await factories.new_terminal(
            client, token, gate.organisation_id, ["transit"], rate_per_minute=60, rate_burst=1
        )

        # Issuing reads the holder's state on the card's slot; every credential is good once.
        holders = [await factories.activated_holder(client, token, "510000") for _ in range(6)]
        texts = [text for holder in holders for text in await factories.credentials(client, holder)]
        answers = await asyncio.gather(*(factories.verify(client, gate, text) for text in texts))
        assert [answer["result"] for answer in answers] == ["accepted"] * len(texts)
        replays = [await factories.verify(client, other, text) for text in texts[:2]]
        assert [(r["reason"], bool(r["first_used_at"])) for r in replays] == [("replayed", True)] * 2
        again = await factories.verify(client, gate, texts[0])
        assert (again["repeated"], again["verification_id"]) == (True, answers[0]["verification_id"])

        # Over its rate, a terminal is refused before the card's slot is touched: nothing consumed.
        [first, second] = [(await factories.credentials(client, holder))[0] for holder in holders[:2]]
        assert (await factories.verify(client, slow, first))["result"] == "accepted"
        refused = await client.post("/v1/verify", json={"credential": second}, headers=slow.headers)
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
        assert (await factories.verify(client, gate, second))["result"] == "accepted"

        # A suspension reaches the card's slot at once; other cards are untouched.
        [shown] = await factories.credentials(client, holders[2])
        await factories.set_ecard_state(client, token, holders[2], "suspended")
        assert (await factories.verify(client, gate, shown))["reason"] == "card_suspended"
        [late] = await factories.credentials(client, holders[3])
        assert (await factories.verify(client, gate, late))["result"] == "accepted"

        # Every decision reaches the database through the shards' streams, exactly once.
        decided = [a["verification_id"] for a in answers] + [r["verification_id"] for r in replays]
        deadline = time.monotonic() + DRAIN_DEADLINE
        while True:
            async with context.sessions() as session:
                found = set(
                    await session.scalars(select(VerificationEvent.id).where(VerificationEvent.id.in_(decided)))
                )
            if found == set(decided) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert found == set(decided)
        # And the drain empties the shards' streams (the later scans' events included).
        while True:
            backlog = await context.events.backlog()
            if backlog == Backlog(0, 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert backlog == Backlog(0, 0)

        # The events went to streams on more than one master.
        direct = async_redis.RedisCluster.from_url(redis_cluster.url)
        try:
            groups = [await direct.xinfo_groups(key) for key in stream_keys(prefix)]
            used = {direct.get_node_from_key(key).name for key, info in zip(stream_keys(prefix), groups, strict=True)
                    if info and int(info[0]["entries-read"] or 0) > 0}  # fmt: skip
        finally:
            await direct.aclose()
        assert len(used) >= 2, used


async def test_scripts_lost_on_every_master_are_loaded_again(redis_cluster: RedisCluster) -> None:
    mirror = RedisStatusMirror.from_url(redis_cluster.url, f"noscript-{uuid.uuid4().hex[:8]}:", cluster=True)
    direct = async_redis.RedisCluster.from_url(redis_cluster.url)
    try:
        cards = [uuid.uuid4().bytes for _ in range(8)]
        for card in cards:
            await mirror.set_status(card, MirroredStatus.ACTIVE)
        for _round in range(2):
            await direct.execute_command("SCRIPT FLUSH", target_nodes=async_redis.RedisCluster.PRIMARIES)
            nonces = [uuid.uuid4().bytes[:NONCE_LENGTH] for _ in cards]
            answers = await asyncio.gather(
                *(mirror.scan(scan(card, nonce, "gate")) for card, nonce in zip(cards, nonces, strict=True))
            )
            assert [answer.result for answer in answers] == [ScanResult.ACCEPTED] * len(cards)
    finally:
        await direct.aclose()
        await mirror.close()


async def test_a_plain_client_fails_closed_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """Pointing the service at a cluster without ECARD_REDIS_CLUSTER gives 503s, never an acceptance."""
    mirror = RedisStatusMirror.from_url(redis_cluster.url, f"plain-{uuid.uuid4().hex[:8]}:")
    try:
        answers = await asyncio.gather(
            *(mirror.scan(scan(uuid.uuid4().bytes, b"n" * NONCE_LENGTH, "gate")) for _ in range(6)),
            return_exceptions=True,
        )
    finally:
        await mirror.close()
    assert not any(getattr(answer, "result", None) == ScanResult.ACCEPTED for answer in answers)
    assert any(isinstance(answer, Exception) for answer in answers)


async def test_ready_on_a_cluster(database_url: str, redis_cluster: RedisCluster) -> None:
    settings = make_settings(database_url, redis_cluster.url, f"health-{uuid.uuid4().hex[:8]}:", redis_cluster=True)
    app: Litestar = create_app(settings)
    async with serve(app) as client:
        token = await operator_token(client, app.state[STATE_KEY], Role.ADMIN, ["*"])
        region = await client.post(
            "/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token)
        )
        assert region.status_code in (201, 409), region.text
        response: httpx.Response = await client.get("/ready")
    assert response.status_code == 200 and response.json()["store"] == "redis", response.text


async def test_a_cold_client_under_a_burst_decides_every_scan_once(redis_cluster: RedisCluster) -> None:
    """redis-py learns the slot map under a lock before a cluster pipeline runs: a cold burst is decided once."""
    prefix = f"cold-{uuid.uuid4().hex[:8]}:"
    warm = RedisStatusMirror.from_url(redis_cluster.url, prefix, cluster=True)
    cards = [uuid.uuid4().bytes for _ in range(60)]
    for card in cards:
        await warm.set_status(card, MirroredStatus.ACTIVE)
    await warm.close()
    cold = RedisStatusMirror.from_url(redis_cluster.url, prefix, cluster=True)
    try:
        answers = await asyncio.gather(*(cold.scan(scan(card, b"n" * NONCE_LENGTH, "gate")) for card in cards))
    finally:
        await cold.close()
    assert [(answer.kind, answer.result) for answer in answers] == [("new", ScanResult.ACCEPTED)] * len(cards)

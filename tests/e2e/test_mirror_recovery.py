"""Redis comes back empty under load, and it is not an outage: the workers refill it, scans go on meanwhile.

The service runs on a redis-server of this test alone, with thousands of active eCards in the database
(put there directly, without a sealed profile, as eCards made before migration 0009 are: the first
fill seals them). The store is SIGKILLed and
restarted empty while gates scan; then, counted exactly: replays of codes used before the loss accepted
(none), codes shown before the loss refused as refresh_required (all), fresh codes of cards not mirrored
yet accepted through the database fallback, within its rate, and how long until the mirror is full.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from sqlalchemy import insert

from app.asgi import create_app
from app.db.clock import utcnow
from app.db.models import Card, ECard, Person
from app.domain.cards.citizen_id import check_character
from app.domain.cards.rebuild import DatabaseFallback, MirrorRecovery, Rebuilder
from app.domain.cards.services import CITIZEN_ID_FIELD, NAME_FIELD, reconcile_status_mirror
from app.domain.operators.services import Role
from app.server.context import STATE_KEY, ServiceContext
from crypto.credential import NONCE_LENGTH, Claims, Purpose, issue_credential
from tests import factories
from tests.conftest import make_settings, operator_token, serve
from tests.factories import Gate, bearer
from tests.servers import RedisServer

CARDS = 3000
FALLBACK_RATE = 100.0
# The refill's page: small, so a few thousand cards take seconds to refill, long enough to scan during it.
PAGE = 10
FAST = {"rate_per_minute": 60_000, "rate_burst": 1_000}


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A Redis server of this test alone, which may be killed."""
    server = RedisServer().start()
    yield server
    server.stop()


class Deployment:
    """The service on its own Redis, fast gates, and bulk eCards whose codes the test signs itself."""

    def __init__(self, client: httpx.AsyncClient, context: ServiceContext, gates: list[Gate]) -> None:
        self.client = client
        self.context = context
        self.gates = gates
        self.cards: list[bytes] = []

    async def add_cards(self, count: int) -> None:
        """Active eCards of region 510000 by SQL, as an import leaves them (no sealed profile yet)."""
        now = utcnow()
        pii = self.context.pii
        persons, cards, ecards = [], [], []
        async with self.context.sessions() as session:
            # Citizen IDs born before 1950, which factories.citizen_id never makes, and distinct among
            # themselves: random ones would collide (a 20 M space, thousands of rows) now and then.
            year, month = 1900 + secrets.randbelow(50), 1 + secrets.randbelow(12)
            for i in range(count):
                person_id, card_id = uuid.uuid4(), uuid.uuid4()
                first17 = f"510000{year}{month:02d}{1 + i // 1000:02d}{i % 1000:03d}"
                citizen_id = first17 + check_character(first17)
                persons.append({
                    "id": person_id, "region_code": "510000", "created_at": now,
                    "citizen_id_index": pii.blind_index(citizen_id, CITIZEN_ID_FIELD),
                    "citizen_id_encrypted": pii.encrypt(citizen_id, CITIZEN_ID_FIELD),
                    "name_encrypted": pii.encrypt("李四", NAME_FIELD),
                })  # fmt: skip
                cards.append({
                    "id": card_id, "person_id": person_id, "region_code": "510000", "state": "active",
                    "card_number": factories.card_number(), "created_at": now,
                })  # fmt: skip
                card_ref = os.urandom(16)
                ecards.append({
                    "id": uuid.uuid4(), "card_id": card_id, "region_code": "510000", "card_ref": card_ref,
                    "state": "active", "activated_at": now, "updated_at": now,
                    "mirror_version": 1,
                })  # fmt: skip
                self.cards.append(card_ref)
            await session.execute(insert(Person), persons)
            await session.execute(insert(Card), cards)
            await session.execute(insert(ECard), ecards)
            await session.commit()

    def code(self, card: bytes, not_before: int) -> str:
        """A transit code of the card, valid from not_before for 60 s, signed as issuing would."""
        key = self.context.directory.keys.signing_keys["510000"]
        claims = Claims(
            card_ref=card, nonce=os.urandom(NONCE_LENGTH), region="510000", purpose=Purpose.TRANSIT,
            not_before=not_before, expires_at=not_before + 60,
        )  # fmt: skip
        return issue_credential(key, claims)

    async def scan(self, gate: Gate, code: str) -> str:
        """One scan: 'accepted', the reason, or the HTTP status and problem code."""
        response = await self.client.post("/v1/verify", json={"credential": code}, headers=gate.headers)
        body = response.json()
        if response.status_code != 200:
            return f"{response.status_code}:{body['code']}"
        return str(body["result"] if body["result"] == "accepted" else body["reason"])

    async def scan_all(self, codes: list[str], gate: int = 0) -> Counter[str]:
        """Scan the codes together at one gate; the answers counted."""
        return Counter(await asyncio.gather(*(self.scan(self.gates[gate], code) for code in codes)))


@pytest.fixture
async def deployment(database_url: str, own_redis: RedisServer, redis_prefix: str) -> AsyncIterator[Deployment]:
    """The app on own_redis (a new store), with its bounded fallback and its recovery, and CARDS bulk eCards."""
    prefix = f"{redis_prefix}recovery-{uuid.uuid4().hex[:8]}:"
    # Its own recovery below (small pages) instead of the one every worker starts; a skew of 1 s, so fresh
    # codes after the loss are valid a second after it.
    settings = make_settings(
        database_url, own_redis.url, prefix, verify_fallback_rate=FALLBACK_RATE, mirror_recovery=False, clock_skew=1
    )
    app = create_app(settings)
    async with serve(app) as client:
        context: ServiceContext = app.state[STATE_KEY]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        await client.post("/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token))
        first = await factories.new_gate(client, token, "510000", "transit", ["transit"])
        gates = [await factories.new_terminal(client, token, first.organisation_id, ["transit"], **FAST) for _ in "ab"]
        world = Deployment(client, context, gates)
        await world.add_cards(CARDS)
        context.recovery = MirrorRecovery(context.sessions, context.mirror, context.pii, prefix, page=PAGE)
        recovering = asyncio.create_task(context.recovery.run())
        yield world
        recovering.cancel()


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 60.0) -> float:
    """Poll check until it holds; the seconds it took (fail saying what did not happen)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what} within {seconds} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_redis_restarted_empty_is_refilled_while_scans_go_on_and_single_use_holds(
    deployment: Deployment, own_redis: RedisServer
) -> None:
    context = deployment.context
    # Before the loss: the store filled (as the operator's first rebuild would), codes used and shown.
    first_fill = await Rebuilder(context.sessions, context.mirror, context.pii, context.settings.redis_prefix).run()
    assert first_fill.cards >= CARDS
    now = int(time.time())
    cards = deployment.cards
    used = [deployment.code(card, now) for card in cards[:300]]
    assert await deployment.scan_all(used) == {"accepted": 300}
    shown = [deployment.code(card, now) for card in cards[300:600]]

    # SIGKILL, and back on the same port with nothing (no persistence), while gates scan.
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGKILL)
    own_redis.process.wait()
    own_redis.process = None
    own_redis.start()
    restarted = time.monotonic()
    replays = asyncio.ensure_future(deployment.scan_all(used, gate=1))

    async def refilling() -> bool:
        return await context.mirror.refilling()

    flag_up_after = await wait_until(refilling, "a worker did not start refilling the store")
    replayed, unused_before = await replays, await deployment.scan_all(shown)
    # Codes shown before the loss may have been used: never accepted, whatever the mirror holds.
    assert replayed == {"refresh_required": 300}
    assert unused_before == {"refresh_required": 300}

    # Fresh codes (issuing starts their windows after the store's new epoch, skew included) of cards the
    # refill has not reached yet are answered from the database, within the fallback's rate.
    fallback = context.verifier.fallback
    assert isinstance(fallback, DatabaseFallback)
    mirrored_before, over_before = fallback.mirrored, fallback.over_rate
    mirror_has = await context.mirror.get_statuses(cards)
    fresh_cards = [card for card, seen in zip(cards, mirror_has, strict=True) if seen is None][-400:]
    assert len(fresh_cards) == 400, "the refill was done before the fresh scans: nothing to fall back for"
    # Each shard has its own epoch (opened by its first scan after the loss, or by the refill): the
    # windows start after the latest of the fresh cards' shards, as issuing does per card.
    states = await asyncio.gather(*(context.mirror.holder_state(card, uuid.UUID(int=0)) for card in fresh_cards))
    epoch_s = -(-max(state.epoch_ms for state in states) // 1000)
    not_before = max(int(time.time()), epoch_s + context.settings.clock_skew)
    await asyncio.sleep(max(0.0, not_before - context.settings.clock_skew - time.time()))
    fresh = [deployment.code(card, not_before) for card in fresh_cards]
    during = await deployment.scan_all(fresh)
    through_database = fallback.mirrored - mirrored_before
    over_rate = fallback.over_rate - over_before
    assert set(during) <= {"accepted", "card_unknown"}, during
    assert through_database >= 1 and during["accepted"] >= through_database
    # Over the rate the answer stays card_unknown: at most a second's burst plus the rate since.
    assert during["card_unknown"] == over_rate
    assert through_database <= FALLBACK_RATE * (1 + (time.monotonic() - restarted)) + 1
    # Single use holds through the fallback: at another gate every code is a replay (a card_unknown used its
    # code too, like any answer the store gave).
    assert await deployment.scan_all(fresh, gate=1) == {"replayed": 400}

    async def refilled() -> bool:
        return not await context.mirror.refilling()

    full_after = flag_up_after + await wait_until(refilled, "the refill did not finish")
    async with context.sessions() as session:
        clean = await reconcile_status_mirror(session, context.mirror, context.pii, repair=False)
    assert (clean.missing, clean.different, clean.profiles_missing) == (0, 0, 0)
    later = [deployment.code(card, int(time.time())) for card in cards[600:900]]
    mirrored_now = fallback.mirrored
    assert await deployment.scan_all(later) == {"accepted": 300}
    assert fallback.mirrored == mirrored_now
    assert context.recovery.rebuilds == 1
    print(
        f"\nredis SIGKILL, restarted empty, {clean.checked} eCards: replays accepted 0 of 300; codes shown before "
        f"the loss refused 300 of 300 (refresh_required); fresh codes of unmirrored cards: {during['accepted']} of "
        f"400 accepted ({through_database} through the database, {over_rate} over its {FALLBACK_RATE:.0f}/s: "
        f"card_unknown); refilling flag up after {flag_up_after:.1f} s, mirror full and flag off after "
        f"{full_after:.1f} s"
    )

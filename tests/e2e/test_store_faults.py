"""The store breaks under load, and the promises hold: single use, suspension, and what a 503 says.

Each test runs the service on a redis-server of its own (never the shared one) and breaks it while
terminals scan: SIGKILLed and restarted empty, stalled with DEBUG SLEEP, paused with CLIENT PAUSE.
Counts are asserted exactly.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from litestar import Litestar
from sqlalchemy import func, select

from app.asgi import create_app
from app.db.models import ECard, MirrorChange, VerificationEvent
from app.domain.cards.services import mirror_all_statuses
from app.domain.operators.services import Role
from app.server.context import STATE_KEY, ServiceContext
from crypto.credential import open_credential
from tests import factories
from tests.conftest import make_settings, operator_token, serve
from tests.factories import Gate, Holder, bearer
from tests.servers import RedisServer

# Terminals of these tests scan far above a real gate's rate.
FAST = {"rate_per_minute": 60_000, "rate_burst": 1_000}


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A Redis server of this test alone, which may be killed, stalled and paused."""
    server = RedisServer(options=["--enable-debug-command", "yes"]).start()
    yield server
    server.stop()


class World:
    """The service on its own Redis, an operator, a region and fast terminals."""

    def __init__(self, client: httpx.AsyncClient, app: Litestar, token: str, gates: list[Gate]) -> None:
        self.client = client
        self.context: ServiceContext = app.state[STATE_KEY]
        self.token = token
        self.gates = gates

    async def holders(self, count: int) -> list[Holder]:
        """Activated cards of region 510000."""
        return list(await asyncio.gather(*(factories.activated_holder(self.client, self.token, "510000")
                                           for _ in range(count))))  # fmt: skip

    async def codes(self, holders: list[Holder], per_holder: int) -> list[str]:
        """Single credentials valid now (one request each, so every one's window is the current one)."""
        requests = [factories.credentials(self.client, holder) for holder in holders for _ in range(per_holder)]
        return [code for batch in await asyncio.gather(*requests) for code in batch]

    async def scan(self, gate: Gate, code: str) -> httpx.Response:
        """One scan at a gate."""
        return await self.client.post("/v1/verify", json={"credential": code}, headers=gate.headers)


@pytest.fixture
async def world(database_url: str, own_redis: RedisServer, redis_prefix: str) -> AsyncIterator[World]:
    """A running app whose status store is own_redis (a new store: epoch 0), draining its own events."""
    prefix = f"{redis_prefix}faults-{uuid.uuid4().hex[:8]}:"
    app = create_app(make_settings(database_url, own_redis.url, prefix, drain_events=True))
    async with serve(app) as client:
        context: ServiceContext = app.state[STATE_KEY]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        await client.post("/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token))
        first = await factories.new_gate(client, token, "510000", "transit", ["transit"])
        gates = [first] + [
            await factories.new_terminal(client, token, first.organisation_id, ["transit"], **FAST) for _ in range(4)
        ]
        # new_gate's own terminal has the default rate: replace it by a fast one.
        gates[0] = await factories.new_terminal(client, token, first.organisation_id, ["transit"], **FAST)
        yield World(client, app, token, gates)


async def open_loop(rate: float, seconds: float, fire: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Call fire(i) at a constant rate for seconds, without waiting for answers (open loop); all results."""
    started = time.monotonic()
    tasks: list[asyncio.Task[Any]] = []
    i = 0
    while (elapsed := time.monotonic() - started) < seconds:
        while i < elapsed * rate:
            tasks.append(asyncio.ensure_future(fire(i)))
            i += 1
        await asyncio.sleep(0.002)
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def outcome(response: httpx.Response) -> str:
    """'accepted', the rejection reason, or the problem code of a 4xx/5xx answer."""
    body = response.json()
    if response.status_code != 200:
        return f"{response.status_code}:{body['code']}"
    return str(body["result"] if body["result"] == "accepted" else body["reason"])


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 15.0) -> None:
    """Poll check until it holds; fail saying what did not happen."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {seconds} s")
        await asyncio.sleep(0.1)


async def settled(context: ServiceContext) -> None:
    """Wait until every void is applied and every event (and marker) is stored."""

    async def no_voids() -> bool:
        return len(context.verifier.voids) == 0

    async def stream_empty() -> bool:
        return (await context.events.backlog()).length == 0

    await wait_until(no_voids, "the voids were not applied")
    await wait_until(stream_empty, "the event stream was not drained")


async def test_codes_used_before_redis_restarts_empty_are_never_accepted_again(
    world: World, own_redis: RedisServer
) -> None:
    holders = await world.holders(50)
    used = await world.codes(holders, 6)
    assert len(used) == 300
    gate_a, gate_b, gate_c = world.gates[:3]
    first = await asyncio.gather(*(world.scan(gate_a, code) for code in used))
    assert Counter(outcome(response) for response in first) == {"accepted": 300}

    # Kill the store under load: fresh scans keep coming from two gates at ~300/s.
    spare = await world.codes(holders, 7)
    killed_at: list[float] = []

    async def fire(i: int) -> httpx.Response:
        if i == 150:
            assert own_redis.process is not None
            own_redis.process.send_signal(signal.SIGKILL)
            own_redis.process.wait()
            killed_at.append(time.monotonic())
        return await world.scan(world.gates[3 + i % 2], spare[i])

    during = await open_loop(300, 1.0, fire)
    answers = Counter(outcome(response) for response in during)
    accepted_while_down = sum(1 for i, response in enumerate(during) if i > 150 and outcome(response) == "accepted")
    assert accepted_while_down == 0, answers
    assert set(answers) <= {"accepted", "503:unavailable", "503:outcome_unknown"}, answers

    # Back, empty (no persistence), and the mirror repaired from the database, as an operator would.
    own_redis.process = None
    own_redis.start()
    async with world.context.sessions() as session:
        assert await mirror_all_statuses(session, world.context.mirror, world.context.pii) >= 50
    # Every code accepted before the loss, shown again at other gates: not one is accepted.
    replays = await asyncio.gather(*(world.scan(gate_b if i % 2 else gate_c, code) for i, code in enumerate(used)))
    assert Counter(outcome(response) for response in replays) == {"refresh_required": 300}

    # The holders' apps fetch fresh codes: accepted once each, as soon as their window opens (≤ 1 s).
    fresh = await world.codes(holders, 1)
    await asyncio.sleep(1 - time.time() % 1 + 0.05)
    recovered = await asyncio.gather(*(world.scan(gate_a, code) for code in fresh))
    assert Counter(outcome(response) for response in recovered) == {"accepted": 50}
    normal_after = time.monotonic() - killed_at[0]
    again = await asyncio.gather(*(world.scan(gate_b, code) for code in fresh))
    assert Counter(outcome(response) for response in again) == {"replayed": 50}
    print(f"\nredis SIGKILL: 0 replays of 300 accepted; normal again {normal_after:.1f} s after the kill")


async def test_a_suspension_made_while_redis_is_paused_reaches_the_gates(world: World, own_redis: RedisServer) -> None:
    [holder] = await world.holders(1)
    codes = await world.codes([holder], 12)
    control = redis.Redis.from_url(own_redis.url)
    async with world.context.sessions() as session:
        ecard = await session.get(ECard, uuid.UUID(holder.ecard_id))
        assert ecard is not None
        version_before = ecard.mirror_version

    # The store stalls for 3 s; the operator suspends the card meanwhile; gates keep scanning it.
    await control.execute_command("CLIENT", "PAUSE", 3000, "ALL")
    paused_at = time.monotonic()
    suspension = asyncio.ensure_future(
        world.client.post(
            f"/v1/operator/cards/{holder.card_id}/ecard-state",
            json={"state": "suspended", "reason": "stolen phone"},
            headers=bearer(world.token),
        )
    )

    async def fire(i: int) -> tuple[float, httpx.Response]:
        response = await world.scan(world.gates[i % 5], codes[i % len(codes)])
        return time.monotonic() - paused_at, response

    load = asyncio.ensure_future(open_loop(4, 6.0, fire))
    answer = await suspension
    # Committed, but the store did not confirm it: said so (202), not "nothing was changed" (503).
    assert answer.status_code == 202, answer.text
    assert answer.headers["ecard-mirror"] == "pending"
    assert answer.json()["ecard_state"] == "suspended"
    results: list[tuple[float, httpx.Response]] = await load
    await control.aclose()

    # The outbox applied it once the store answered again: the mirror has the new version, no row waits.
    async def applied() -> bool:
        async with world.context.sessions() as session:
            waiting = await session.scalar(select(func.count()).select_from(MirrorChange))
        return waiting == 0 and await world.context.mirror.get_statuses([_card_ref(world, codes[0])]) == ["S"]

    await wait_until(applied, "the suspension did not reach the mirror", 5.0)
    async with world.context.sessions() as session:
        ecard = await session.get(ECard, uuid.UUID(holder.ecard_id))
        assert ecard is not None and ecard.mirror_version == version_before + 1
    # Scans sent more than a second after the pause ended (the applier's bound; two on a loaded machine
    # sharing its cores with the test's own load) never see the card active.
    accepted_late = [at for at, response in results if at > 5.0 and outcome(response) == "accepted"]
    assert accepted_late == [], "accepted more than two seconds after the store answered again"
    assert {outcome(response) for at, response in results if at > 5.0} <= {"card_suspended", "replayed"}
    # No new codes for a suspended card, and a retry of the change says what it is.
    refused = await world.client.post(
        "/v1/holder/credentials", json={"purpose": "transit", "count": 1}, auth=holder.auth
    )
    assert refused.status_code == 409
    again = await world.client.post(
        f"/v1/operator/cards/{holder.card_id}/ecard-state",
        json={"state": "suspended", "reason": "stolen phone"},
        headers=bearer(world.token),
    )
    assert again.status_code == 409 and again.json()["current_state"] == "suspended"


def _card_ref(world: World, code: str) -> bytes:
    return open_credential(
        code, world.context.directory.keys.verify_keys, world.context.directory.keys.seals
    ).claims.card_ref


async def test_a_503_after_a_stall_says_outcome_unknown_and_the_record_tells_the_truth(
    world: World, own_redis: RedisServer
) -> None:
    holders = await world.holders(40)
    codes = await world.codes(holders, 15)
    assert len(codes) == 600
    control = redis.Redis.from_url(own_redis.url)
    stalled: list[asyncio.Task[Any]] = []

    async def fire(i: int) -> tuple[int, httpx.Response]:
        if i == 100:
            # DEBUG SLEEP blocks the server for 3 s: its reply comes after it, so it runs in a task.
            stalled.append(asyncio.ensure_future(control.execute_command("DEBUG", "SLEEP", 3)))
        return i, await world.scan(world.gates[i % 5], codes[i])

    answered = await open_loop(150, 4.0, fire)
    await asyncio.gather(*stalled)
    await control.aclose()
    by_outcome = Counter(outcome(response) for _, response in answered)
    assert set(by_outcome) <= {"accepted", "503:outcome_unknown", "503:unavailable"}, by_outcome
    assert by_outcome["503:outcome_unknown"] >= 50, by_outcome
    told_accepted = {codes[i] for i, response in answered if outcome(response) == "accepted"}
    told_unknown = [i for i, response in answered if outcome(response) == "503:outcome_unknown"]
    detail = next(response for _, response in answered if response.status_code == 503).json()["detail"]
    assert "may have been used up" in detail

    # Voids are applied once the store answers; then every event is drained.
    await settled(world.context)
    ours = VerificationEvent.organisation_id == uuid.UUID(world.gates[0].organisation_id)
    async with world.context.sessions() as session:
        delivered_accepted = await session.scalar(
            select(func.count())
            .select_from(VerificationEvent)
            .where(ours, VerificationEvent.result == "accepted", VerificationEvent.answer_delivered.is_(True))
        )
        undelivered = await session.scalar(
            select(func.count())
            .select_from(VerificationEvent)
            .where(ours, VerificationEvent.answer_delivered.is_(False))
        )
    # The record says "accepted" exactly for the answers gates showed; what ran unseen is marked so.
    assert delivered_accepted == len(told_accepted)
    # Every code whose caller was told 503 either ran (marked undelivered: another gate now sees a replay)
    # or was cancelled (still unused: another gate accepts it). Nothing in between.
    second_look = await asyncio.gather(*(world.scan(world.gates[(i + 1) % 5], codes[i]) for i in told_unknown))
    after = Counter(outcome(response) for response in second_look)
    assert set(after) <= {"accepted", "replayed"}, after
    assert after["replayed"] == undelivered
    ran, cancelled = after["replayed"], after["accepted"]
    print(f"\nDEBUG SLEEP 3: {by_outcome}; of the 503s {ran} had run (marked undelivered), {cancelled} were cancelled")


async def test_the_same_terminals_retry_after_an_unknown_outcome_gets_the_first_answer(
    world: World, own_redis: RedisServer
) -> None:
    holders = await world.holders(5)
    codes = await world.codes(holders, 1)
    control = redis.Redis.from_url(own_redis.url)
    gate = world.gates[0]
    sleeper = asyncio.ensure_future(control.execute_command("DEBUG", "SLEEP", 1.5))
    await asyncio.sleep(0.05)
    first = await asyncio.gather(*(world.scan(gate, code) for code in codes))
    await sleeper
    await control.aclose()
    assert [outcome(response) for response in first] == ["503:outcome_unknown"] * 5
    retried = await asyncio.gather(*(world.scan(gate, code) for code in codes))
    # The stalled scans ran after the sleep: the retry gets their answer (or a fresh one if they were
    # cancelled first); either way accepted, and accepted once.
    assert {outcome(response) for response in retried} == {"accepted"}
    elsewhere = await asyncio.gather(*(world.scan(world.gates[1], code) for code in codes))
    assert {outcome(response) for response in elsewhere} == {"replayed"}
    await settled(world.context)
    async with world.context.sessions() as session:
        query = select(VerificationEvent.answer_delivered).where(
            VerificationEvent.organisation_id == uuid.UUID(gate.organisation_id), VerificationEvent.result == "accepted"
        )
        accepted = list(await session.scalars(query))
    # One accepted event per code, and each says its answer reached the gate (by the retry).
    assert accepted == [True] * 5


async def test_a_terminal_disabled_while_redis_is_down_is_refused_by_every_worker_within_a_second(
    database_url: str, own_redis: RedisServer, redis_prefix: str
) -> None:
    prefix = f"{redis_prefix}directory-{uuid.uuid4().hex[:8]}:"
    first, second = (create_app(make_settings(database_url, own_redis.url, prefix)) for _ in range(2))
    async with serve(first) as client, serve(second):
        context: ServiceContext = first.state[STATE_KEY]
        other: ServiceContext = second.state[STATE_KEY]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        await client.post("/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token))
        gate = await factories.new_gate(client, token, "510000", "transit", ["transit"])

        async def known_to_the_other_worker() -> bool:
            return other.directory.authenticate(gate.api_key) is not None

        await wait_until(known_to_the_other_worker, "the new terminal did not reach the other worker", 3.0)
        # No Redis, so no announcement: the database's change counter carries the change alone.
        own_redis.stop()
        response = await client.patch(
            f"/v1/operator/terminals/{gate.terminal_id}", json={"enabled": False}, headers=bearer(token)
        )
        assert response.status_code == 200, response.text
        changed_at = time.monotonic()

        async def refused_by_the_other_worker() -> bool:
            return other.directory.authenticate(gate.api_key) is None

        await wait_until(refused_by_the_other_worker, "the other worker still knows the disabled terminal", 3.0)
        assert time.monotonic() - changed_at < 2.0
        own_redis.start()


async def test_an_idle_drain_does_not_report_its_own_blocking_read_as_an_outage(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    await asyncio.sleep(3.5)
    unavailable = [record for record in caplog.records if "event stream unavailable" in record.getMessage()]
    assert unavailable == []

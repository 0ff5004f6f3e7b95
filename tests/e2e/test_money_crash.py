"""Issue 5: 1,000 medical settlements, each sent three times, while the service is SIGKILLed at random.

A real uvicorn server (one worker) on PostgreSQL and Redis is killed at random moments while
settlements are in flight and restarted; the client retries every attempt that got no answer
with the same Idempotency-Key and body, and then sends each settlement twice more. Whatever the
kills hit — before the claim, between the claim and the work's commit, between the commit and
the reply — the ledger must end with exactly one balanced transaction per verification, every
answer of a key must name that transaction, and nothing may be left in flight.

The 1,000 accepted medical verifications are written straight into `verification_events`: they
stand in for 1,000 scans (the verify path and the event drain have tests of their own).

The second test holds a first attempt (alive, only slow) past the 30 s after which a retry takes
its claim over: the key must still keep one answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import create_engine, create_session_factory
from app.db.models import ECard, IdempotencyRecord, LedgerPosting, LedgerTransaction, VerificationEvent
from app.domain.ledger.idempotency import STALE_AFTER
from app.settings import PROJECT_ROOT
from tests import factories
from tests.conftest import _drop_postgres_database, migrated_database
from tests.factories import Gate, bearer
from tests.servers import free_port

SETTLEMENTS = 1_000
SENDS = 3  # each settlement is sent three times with the same key and body
CARDS = 20
CONCURRENCY = 16  # requests in flight at most
ACTIVE_KEYS = 64  # settlements under way at most
MIN_KILLS = 8
MAX_KILLS = 40
KILL_EVERY = (0.3, 1.0)  # seconds of service between two kills
EXTRA_ROUNDS = 3  # bounded extra rounds if the work ended before MIN_KILLS or a "committed, reply lost" case
EXTRA_SETTLEMENTS = 300
CONNECTION_RETRY_PAUSE = (0.05, 1.0)  # doubling from the first to the last, with jitter
IN_PROGRESS_RETRY_PAUSE = 1.0  # a claim orphaned by a kill is taken over after 30 s
START_TIMEOUT = 30.0
VENV_BIN = Path(sys.executable).parent


def _log_file(path: Path) -> IO[bytes]:
    return path.open("ab")


class Server:
    """One uvicorn worker on a fixed port that can be SIGKILLed and started again."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0

    async def start(self) -> None:
        """Start the server and wait until /health answers."""
        self.starts += 1
        with _log_file(self.log_path) as log:
            log.write(f"\n--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                str(VENV_BIN / "uvicorn"), "--factory", "app.asgi:create_app", "--host", "127.0.0.1",
                "--port", str(self.port), "--no-access-log",
                cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient(base_url=self.url, timeout=1) as probe:
            while True:
                try:
                    if (await probe.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.process.returncode is not None or time.monotonic() > deadline:
                    await self.stop()
                    raise RuntimeError(f"server did not start: {self.log_path.read_text()[-4000:]}")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown hook, no finally block, no reply written after this instant."""
        assert self.process is not None and self.process.returncode is None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self.kills += 1

    async def stop(self) -> None:
        """Stop it for good (gracefully when it lets us)."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@pytest.fixture(scope="module")
async def crash_env(
    postgres_url: URL, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, str]]:
    """A database of its own, and a Redis prefix of its own; both removed at the end."""
    url = await migrated_database("postgres", tmp_path_factory.mktemp("crash"), postgres_url)
    prefix = f"{redis_prefix}crash-{uuid.uuid4().hex[:6]}:"
    env = {
        **os.environ,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "REDIS_URL": redis_url,
        "ECARD_REDIS_PREFIX": prefix,
        "WEB_CONCURRENCY": "1",
    }
    try:
        yield env
    finally:
        await _drop_postgres_database(postgres_url, url.database or "")
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
        finally:
            await client.aclose()


@pytest.fixture(scope="module")
async def server(crash_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """The service, one worker; stopped at the end whatever state the test left it in."""
    running = Server(crash_env, tmp_path_factory.mktemp("crash-log") / "server.log")
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


def verification_id() -> str:
    """A verification id as the verify path makes them: "vf_" and 16 base64url characters."""
    return "vf_" + secrets.token_urlsafe(12)


async def store_verifications(database_url: str, gate: Gate, card_refs: list[bytes], count: int) -> list[str]:
    """Accepted medical verifications of the hospital, as the event drain would have stored them."""
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    ids = [verification_id() for _ in range(count)]
    try:
        async with create_session_factory(engine)() as session:
            hospital = {"terminal_id": uuid.UUID(gate.terminal_id), "organisation_id": uuid.UUID(gate.organisation_id)}
            session.add_all(
                VerificationEvent(
                    id=each,
                    occurred_at=now,
                    card_ref=card_refs[i % len(card_refs)],
                    nonce=os.urandom(12),
                    card_region="510000",
                    purpose="medical",
                    result="accepted",
                    channel="online",
                    **hospital,
                )
                for i, each in enumerate(ids)
            )
            await session.commit()
    finally:
        await engine.dispose()
    return ids


@dataclass
class Attempt:
    """One HTTP attempt of one send: an answer (status, replay header, body) or a transport error."""

    send: int
    status: int | None = None
    replayed: bool = False
    body: Any = None
    error: str | None = None


@dataclass
class Settlement:
    """One settlement: its key and body, and every attempt made with them."""

    key: str
    verification_id: str
    total_fen: int
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def answers(self) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.status is not None]

    def committed_reply_lost(self) -> bool:
        """The first 201 this key ever got is a replay, right after a dropped connection: an attempt
        whose reply never arrived committed the work (only the work's transaction stores a 201)."""
        for index, attempt in enumerate(self.attempts):
            if attempt.status == 201:
                return attempt.replayed and index > 0 and self.attempts[index - 1].error is not None
        return False

    def waited_for_stale_claim(self) -> bool:
        """A kill between the claim's commit and the work's: the retry saw the key in progress."""
        return any(attempt.status == 409 for attempt in self.attempts)


def not_an_answer(status: int | None, body: Any) -> bool:
    """No answer yet: the server is down, or the key's first attempt is (apparently) still in flight."""
    if status is None or status >= 500:
        return True
    return status == 409 and isinstance(body, dict) and "in progress" in str(body.get("detail", ""))


@dataclass
class Run:
    """The client side: sends settlements with bounded concurrency, counts requests in flight."""

    base_url: str
    gate: Gate
    limit: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONCURRENCY))
    active: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(ACTIVE_KEYS))
    in_flight: int = 0
    lost_replies: int = 0

    async def settle(self, client: httpx.AsyncClient, settlement: Settlement) -> None:
        """Send it SENDS times; retry each send with the same key and body until it gets an answer.

        At most ACTIVE_KEYS settlements are under way at once (as a hospital's queue of bills would
        be), except those waiting for a claim orphaned by a kill to go stale, which step aside.
        """
        headers = {**self.gate.headers, "Idempotency-Key": settlement.key}
        body = {"verification_id": settlement.verification_id, "total_fen": settlement.total_fen}
        await self.active.acquire()
        try:
            for send in range(SENDS):
                failures = 0
                while True:
                    attempt = Attempt(send)
                    settlement.attempts.append(attempt)
                    async with self.limit:
                        self.in_flight += 1
                        try:
                            response = await client.post("/v1/terminal/medical-settlements", json=body, headers=headers)
                        except httpx.TransportError as exc:
                            attempt.error = type(exc).__name__
                        finally:
                            self.in_flight -= 1
                    if attempt.error is not None:
                        failures += 1
                        first, most = CONNECTION_RETRY_PAUSE
                        await asyncio.sleep(min(most, first * 2**failures) * random.uniform(0.5, 1.0))
                        continue
                    attempt.status = response.status_code
                    attempt.replayed = response.headers.get("idempotent-replayed") == "true"
                    attempt.body = response.json() if response.content else None
                    if attempt.status == 409 and not_an_answer(attempt.status, attempt.body):
                        self.active.release()
                        try:
                            await asyncio.sleep(IN_PROGRESS_RETRY_PAUSE)
                        finally:
                            await self.active.acquire()
                        continue
                    if not_an_answer(attempt.status, attempt.body):
                        await asyncio.sleep(0.2)
                        continue
                    break
                if send == 0 and settlement.committed_reply_lost():
                    self.lost_replies += 1
        finally:
            self.active.release()

    async def kill_at_random(self, server: Server, rng: random.Random, done: asyncio.Event) -> None:
        """SIGKILL the server every 0.3 to 1.0 s of service while requests are in flight, and restart it;
        stop once MIN_KILLS were made and a "committed, reply lost" case was seen (or at MAX_KILLS)."""
        while not done.is_set() and server.kills < MAX_KILLS and not self.enough(server):
            await asyncio.sleep(rng.uniform(*KILL_EVERY))
            if done.is_set() or self.in_flight == 0:
                continue
            await server.kill()
            await server.start()

    def enough(self, server: Server) -> bool:
        """Enough kills, and one of them fell between a commit and its reply."""
        return server.kills >= MIN_KILLS and self.lost_replies > 0

    async def round(self, server: Server, settlements: list[Settlement], rng: random.Random) -> None:
        """Every settlement sent SENDS times, the killer at work meanwhile."""
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=20) as client:

            async def everything() -> None:
                try:
                    async with asyncio.TaskGroup() as group:
                        for settlement in settlements:
                            group.create_task(self.settle(client, settlement))
                finally:
                    done.set()

            async with asyncio.TaskGroup() as group:
                group.create_task(everything())
                group.create_task(self.kill_at_random(server, rng, done))


def new_settlements(ids: list[str], rng: random.Random) -> list[Settlement]:
    return [Settlement(secrets.token_urlsafe(16), each, rng.randint(1, 10_000_000)) for each in ids]


@dataclass
class Site:
    """What the settlements need: an admin's token, the hospital's terminal, the cards' references."""

    admin: str
    hospital: Gate
    card_refs: list[bytes]


@pytest.fixture(scope="module")
async def site(server: Server, crash_env: dict[str, str]) -> Site:
    """An admin (CLI), region 510000, a hospital with a medical terminal and CARDS activated cards (API)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        admin = await factories.cli_admin(crash_env, client)
        hospital = await factories.new_gate(client, admin, "510000", "hospital", ["medical"])
        holders = []
        for _ in range(CARDS // 5):
            holders += await asyncio.gather(*(factories.activated_holder(client, admin, "510000") for _ in range(5)))
    engine = create_engine(crash_env["DATABASE_URL"])
    try:
        async with create_session_factory(engine)() as session:
            card_refs = list(
                await session.scalars(
                    select(ECard.card_ref).where(ECard.id.in_([uuid.UUID(h.ecard_id) for h in holders]))
                )
            )
    finally:
        await engine.dispose()
    assert len(card_refs) == CARDS
    return Site(admin, hospital, card_refs)


async def test_a_thousand_settlements_survive_kills_between_commit_and_reply(
    server: Server, crash_env: dict[str, str], site: Site
) -> None:
    started = time.monotonic()
    database_url = crash_env["DATABASE_URL"]
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    admin, hospital, card_refs = site.admin, site.hospital, site.card_refs
    ids = await store_verifications(database_url, hospital, card_refs, SETTLEMENTS)
    settlements = new_settlements(ids, rng)
    set_up = time.monotonic() - started

    run = Run(server.url, hospital)
    await run.round(server, settlements, rng)
    extra: list[Settlement] = []
    for _ in range(EXTRA_ROUNDS):  # bounded: only when the work ended before enough kills hit it
        if run.enough(server):
            break
        more = new_settlements(
            await store_verifications(database_url, hospital, card_refs, EXTRA_SETTLEMENTS), rng
        )  # fmt: skip
        await run.round(server, more, rng)
        extra += more
    ran = time.monotonic() - started - set_up
    everything = settlements + extra
    waited = sum(s.waited_for_stale_claim() for s in everything)
    errors = sum(1 for s in everything for a in s.attempts if a.error)
    print(  # the run's figures, shown with -s
        f"\nseed {seed}: set-up {set_up:.1f} s, run {ran:.1f} s, {server.kills} kills, "
        f"{run.lost_replies} committed-but-reply-lost, {waited} waited for a stale claim, "
        f"{errors} connection errors, {len(extra)} extra settlements "
        f"(database {database_url.rsplit('/', 1)[-1]}, Redis prefix {crash_env['ECARD_REDIS_PREFIX']})"
    )

    statuses = {a.status for s in everything for a in s.answers}
    assert statuses <= {201, 409}, statuses  # nothing but answers and "in progress": no 5xx, no 422
    assert server.kills >= MIN_KILLS
    assert run.lost_replies >= 1, "no kill ever fell between a commit and its reply"

    # Per key: every send ended in a 201, all naming one transaction with identical bodies; at most
    # one of them is the original (not replayed) answer.
    for settlement in everything:
        final = [a for a in settlement.answers if not not_an_answer(a.status, a.body)]
        assert [a.send for a in final] == list(range(SENDS)), settlement
        assert {a.status for a in final} == {201}, settlement
        bodies = [a.body for a in settlement.answers if a.status == 201]
        assert all(body == bodies[0] for body in bodies), settlement
        assert bodies[0]["verification_id"] == settlement.verification_id
        assert bodies[0]["total_fen"] == settlement.total_fen
        assert sum(not a.replayed for a in settlement.answers if a.status == 201) <= 1, settlement

    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            rows = (
                await session.execute(
                    select(
                        LedgerTransaction.verification_id,
                        LedgerTransaction.id,
                        LedgerTransaction.amount_fen,
                        LedgerTransaction.created_at,
                    )
                    .where(LedgerTransaction.kind == "medical_settlement")
                    .where(LedgerTransaction.verification_id.in_([s.verification_id for s in everything]))
                )
            ).all()
            per_transaction = (
                await session.execute(
                    select(LedgerPosting.transaction_id, func.sum(LedgerPosting.amount_fen), func.count()).group_by(
                        LedgerPosting.transaction_id
                    )
                )
            ).all()
            whole_ledger = await session.scalar(select(func.coalesce(func.sum(LedgerPosting.amount_fen), 0)))
            all_transactions = await session.scalar(select(func.count()).select_from(LedgerTransaction))
            open_keys = await session.scalar(
                select(func.count())
                .select_from(IdempotencyRecord)
                .where(IdempotencyRecord.key.in_([s.key for s in everything]))
                .where(IdempotencyRecord.completed_at.is_(None))
            )
            stored_keys = await session.scalar(
                select(func.count())
                .select_from(IdempotencyRecord)
                .where(IdempotencyRecord.key.in_([s.key for s in everything]))
            )
    finally:
        await engine.dispose()

    # Exactly one transaction per verification: none missing, none twice, nothing else written.
    by_verification: dict[str, list[tuple[uuid.UUID, int]]] = {}
    for verification, transaction_id, amount, _ in rows:
        by_verification.setdefault(str(verification), []).append((transaction_id, amount))
    days = {created_at.astimezone(UTC).date() for *_, created_at in rows}  # a run may straddle midnight UTC
    assert len(rows) == len(everything) == all_transactions
    assert sorted(by_verification) == sorted(s.verification_id for s in everything)
    for settlement in everything:
        [(transaction_id, amount)] = by_verification[settlement.verification_id]
        answer = next(a.body for a in settlement.answers if a.status == 201)
        assert answer["transaction_id"] == str(transaction_id) and amount == settlement.total_fen
    # Double entry: every transaction balances, and so does the whole ledger.
    assert len(per_transaction) == len(everything)
    assert all(total == 0 and postings >= 2 for _, total, postings in per_transaction)
    assert whole_ledger == 0
    # Nothing left in flight: every key's answer is stored (no claim waits for its 30 s takeover).
    assert (open_keys, stored_keys) == (0, len(everything))

    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        transactions = 0
        for day in sorted(days):
            response = await client.get(
                f"/v1/operator/verifier-organisations/{hospital.organisation_id}/reconciliation",
                params={"day": day.isoformat()},
                headers=bearer(admin),
            )
            assert response.status_code == 200, response.text
            assert response.json()["balanced"] is True and response.json()["total_fen"] == 0
            transactions += response.json()["transactions"]
    assert transactions == len(everything) == SETTLEMENTS + len(extra)


async def claimed_at(engine: AsyncEngine, key: str, after: datetime | None) -> datetime:
    """When the key was (last) claimed, once a claim newer than after is there."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with create_session_factory(engine)() as session:
            found = await session.scalar(select(IdempotencyRecord.created_at).where(IdempotencyRecord.key == key))
        if found is not None and (after is None or found > after):
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"no claim of the key after {after}")


async def test_a_slow_first_attempt_taken_over_after_30_s_keeps_the_key_s_one_answer(
    server: Server, crash_env: dict[str, str], site: Site
) -> None:
    """The takeover cannot tell a dead first attempt from a slow one: the key must keep one answer anyway.

    The first attempt is held at its ledger insert (a table lock) for longer than STALE_AFTER; the retry
    takes the claim over and reaches the same insert; then the lock goes.
    """
    database_url = crash_env["DATABASE_URL"]
    [verification] = await store_verifications(database_url, site.hospital, site.card_refs, 1)
    headers = {**site.hospital.headers, "Idempotency-Key": secrets.token_urlsafe(16)}
    body = {"verification_id": verification, "total_fen": 12_345}
    engine = create_engine(database_url)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def send() -> httpx.Response:
                return await client.post("/v1/terminal/medical-settlements", json=body, headers=headers)

            async with engine.connect() as blocker:
                await blocker.execute(text("LOCK TABLE ledger_transactions IN SHARE MODE"))
                first = asyncio.create_task(send())
                claimed = await claimed_at(engine, headers["Idempotency-Key"], None)
                await asyncio.sleep(STALE_AFTER.total_seconds() + 0.5)
                if first.done():
                    pytest.fail(f"the first attempt was not held at the lock: {first.result().text}")
                second = asyncio.create_task(send())
                await claimed_at(engine, headers["Idempotency-Key"], claimed)  # taken over
                await asyncio.sleep(0.5)  # and waiting at the same insert
                await blocker.rollback()
            answers = [await first, await second, await send()]
        async with create_session_factory(engine)() as session:
            charged = await session.scalar(
                select(func.count()).where(LedgerTransaction.verification_id == verification)
            )
    finally:
        await engine.dispose()

    if charged != 1:  # the unique constraint holds: no double charge either way (not the bug marked above)
        pytest.fail(f"verification {verification} charged {charged} times")
    final = [answer for answer in answers if not not_an_answer(answer.status_code, answer.json())]
    assert final and {answer.status_code for answer in final} == {201}, [(a.status_code, a.text) for a in answers]
    assert all(answer.json() == final[0].json() for answer in final)

"""Verification events: every answered verification stored once, what holders and operators read from them,
and the drain surviving SIGKILL.

The verify path appends one event per answer to a Redis stream in the same round trip that decides it;
a drain (`litestar ecard events drain`, or a lifespan task in the embedded setup) stores each in
`verification_events` once by verification id. With REDIS_URL set the shared test app does not drain
in-process, so these tests drain explicitly; other tests share that stream, so everything here is
compared by the verification ids this module created, never by totals.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py); the crash test
runs `litestar ecard events drain` as a subprocess on a fresh migrated database of each backend.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from redis.exceptions import ResponseError
from sqlalchemy import func, select
from sqlalchemy.engine import URL

from app.asgi import create_app
from app.db.clock import as_utc
from app.db.models import VerificationEvent, VerifierOrganisation
from app.domain.operators.services import Role
from app.domain.verification.events import ONLINE, EventRecord, encode_event
from app.server.context import STATE_KEY, ServiceContext
from app.settings import PROJECT_ROOT
from app.stores.event_stream import GROUP, EventStream, StreamEntry, StreamUnavailable, stream_keys
from app.stores.status_mirror import RateLimit, Scan
from crypto.credential import NONCE_LENGTH, Claims, issue_credential, open_credential
from tests import factories
from tests.conftest import BACKENDS, _drop_postgres_database, make_settings, migrated_database, operator_token, serve
from tests.factories import Gate, Holder, bearer, problem

SICHUAN = "510000"
VENV_BIN = Path(sys.executable).parent


# --- helpers ---------------------------------------------------------------------------------


def claims_of(context: ServiceContext, credential: str) -> Claims:
    """What an issued credential says."""
    return open_credential(credential, context.directory.keys.verify_keys, context.directory.keys.seals).claims


def resign(context: ServiceContext, claims: Claims, **changes: Any) -> str:
    """A credential with changed claims (and a fresh nonce), signed with the region's real key."""
    key = context.directory.keys.signing_keys[claims.region]
    return issue_credential(key, replace(claims, nonce=os.urandom(NONCE_LENGTH), **changes))


def expired_credential(context: ServiceContext, credential: str) -> str:
    """A genuine credential of the same card whose window closed a minute ago."""
    now = int(time.time())
    return resign(context, claims_of(context, credential), not_before=now - 120, expires_at=now - 60)


async def drain(context: ServiceContext) -> int:
    """Drain the shared stream into the database until it is empty; the number of entries handled."""
    drainer = context.event_drain(block_ms=0, claim_idle_ms=0)
    moved = 0
    while count := await drainer.run_once():
        moved += count
    return moved


async def stored(context: ServiceContext, ids: list[str]) -> dict[str, VerificationEvent]:
    """The stored events with these ids."""
    async with context.sessions() as session:
        rows = await session.scalars(select(VerificationEvent).where(VerificationEvent.id.in_(ids)))
        return {row.id: row for row in rows}


async def ids_of_terminals(context: ServiceContext, *gates: Gate) -> list[str]:
    """Ids of every stored event of these terminals (with repeats, if the table had any)."""
    terminals = [uuid.UUID(gate.terminal_id) for gate in gates]
    async with context.sessions() as session:
        return list(
            await session.scalars(select(VerificationEvent.id).where(VerificationEvent.terminal_id.in_(terminals)))
        )


async def organisation_names(client: httpx.AsyncClient, token: str) -> dict[str, tuple[str, str]]:
    """Organisation id → (name, business type), as the operator API lists them."""
    response = await client.get("/v1/operator/verifier-organisations", headers=bearer(token))
    assert response.status_code == 200, response.text
    return {org["id"]: (org["name"], org["business_type"]) for org in response.json()}


async def usage(client: httpx.AsyncClient, holder: Holder, **params: Any) -> list[dict[str, Any]]:
    """GET /v1/holder/usage (asserting 200)."""
    response = await client.get("/v1/holder/usage", params=params, auth=holder.auth)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def moment(text: str) -> datetime:
    """A timestamp of the API (one without an offset read as UTC: see the time zone test in
    test_batch_and_offline.py)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def fast_gate(client: httpx.AsyncClient, token: str, organisation_id: str, purposes: list[str]) -> Gate:
    """A terminal that no test here pushes over its rate."""
    return await factories.new_terminal(
        client, token, organisation_id, purposes, rate_per_minute=60_000, rate_burst=1_000
    )


# --- 1. one event per answered verification --------------------------------------------------


async def test_every_answered_verification_is_stored_once_with_its_result(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    started = datetime.now(UTC)
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate_a = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit", "general"])
    gate_b = await factories.new_terminal(client, admin_token, gate_a.organisation_id, ["transit"])
    [credential] = await factories.credentials(client, holder)
    [medical] = await factories.credentials(client, holder, "medical")
    card_ref = claims_of(context, credential).card_ref

    accepted = await factories.verify(client, gate_a, credential)
    retry = await factories.verify(client, gate_a, credential)
    replayed = await factories.verify(client, gate_b, credential)
    expired = await factories.verify(client, gate_a, expired_credential(context, credential))
    malformed = await factories.verify(client, gate_a, "EC1:0")
    not_allowed = await factories.verify(client, gate_a, medical)

    # The answers themselves, to be sure each row below stands for what its name says.
    assert accepted["result"] == "accepted" and not accepted.get("repeated", False)
    assert (retry["verification_id"], retry["repeated"]) == (accepted["verification_id"], True)
    assert (replayed["reason"], replayed.get("repeated", False)) == ("replayed", False)
    assert expired["reason"] == "expired"
    assert malformed["reason"] == "malformed"
    assert not_allowed["reason"] == "purpose_not_allowed"

    expected: dict[str, tuple[str, Gate, str | None, bytes | None]] = {
        accepted["verification_id"]: ("accepted", gate_a, "transit", card_ref),
        replayed["verification_id"]: ("replayed", gate_b, "transit", card_ref),
        expired["verification_id"]: ("expired", gate_a, "transit", card_ref),
        malformed["verification_id"]: ("malformed", gate_a, None, None),
        not_allowed["verification_id"]: ("purpose_not_allowed", gate_a, "medical", card_ref),
    }
    assert len(expected) == 5, "every verification but the retry has an id of its own"

    await drain(context)
    rows = await stored(context, list(expected))
    assert set(rows) == set(expected)
    finished = datetime.now(UTC)
    for verification_id, (result, gate, purpose, ref) in expected.items():
        row = rows[verification_id]
        assert row.result == result, verification_id
        assert row.terminal_id == uuid.UUID(gate.terminal_id)
        assert row.organisation_id == uuid.UUID(gate.organisation_id)
        assert row.purpose == purpose
        assert (bytes(row.card_ref) if row.card_ref is not None else None) == ref
        assert row.card_region == (SICHUAN if ref is not None else None)
        assert row.channel == ONLINE
        assert row.scanned_at is None
        assert started - timedelta(seconds=1) <= as_utc(row.occurred_at) <= finished
    # The retry added no row: the two terminals have exactly these events, each once.
    assert sorted(await ids_of_terminals(context, gate_a, gate_b)) == sorted(expected)

    # Draining again stores nothing twice.
    await drain(context)
    assert sorted(await ids_of_terminals(context, gate_a, gate_b)) == sorted(expected)


async def test_a_rate_limited_request_records_no_event(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    organisation = (await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])).organisation_id
    gate = await factories.new_terminal(client, admin_token, organisation, ["transit"], rate_per_minute=1, rate_burst=1)
    [first, second] = [(await factories.credentials(client, holder))[0] for _ in range(2)]
    answered = await factories.verify(client, gate, first)
    assert answered["result"] == "accepted"
    response = await client.post("/v1/verify", json={"credential": second}, headers=gate.headers)
    assert problem(response, 429)["code"] == "rate_limited"
    response = await client.post("/v1/verify", json={"credential": "EC1:0"}, headers=gate.headers)
    assert problem(response, 429)["code"] == "rate_limited"

    await drain(context)
    assert await ids_of_terminals(context, gate) == [answered["verification_id"]]


# --- 2. the holder's view ----------------------------------------------------------------------


async def test_holder_sees_own_verifications_newest_first_with_paging(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    other = await factories.activated_holder(client, admin_token, SICHUAN)
    metro = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    metro_exit = await factories.new_terminal(client, admin_token, metro.organisation_id, ["transit"])
    library = await factories.new_gate(client, admin_token, SICHUAN, "library", ["library"])
    names = await organisation_names(client, admin_token)

    done: list[tuple[str, Gate, str, str]] = []  # (verification id, gate, purpose, result), oldest first

    async def scan(gate: Gate, credential: str, purpose: str, result: str) -> None:
        body = await factories.verify(client, gate, credential)
        assert body.get("reason", body["result"]) == result
        done.append((body["verification_id"], gate, purpose, result))
        await asyncio.sleep(0.003)  # distinct millisecond timestamps, so "newest first" is well defined

    [ride] = await factories.credentials(client, holder)
    await scan(metro, ride, "transit", "accepted")
    await scan(metro_exit, ride, "transit", "replayed")
    [book] = await factories.credentials(client, holder, "library")
    await scan(library, book, "library", "accepted")
    [wrong] = await factories.credentials(client, holder, "library")
    await scan(metro, wrong, "library", "purpose_not_allowed")
    await scan(metro, expired_credential(context, ride), "transit", "expired")
    # Another holder's scans at the same gates, interleaved.
    [others] = await factories.credentials(client, other)
    others_answer = await factories.verify(client, metro, others)
    await drain(context)

    entries = await usage(client, holder)
    assert [entry["verification_id"] for entry in entries] == [item[0] for item in reversed(done)]
    for entry, (_, gate, purpose, result) in zip(entries, reversed(done), strict=True):
        name, business_type = names[gate.organisation_id]
        assert (entry["organisation"], entry["business_type"]) == (name, business_type)
        assert (entry["purpose"], entry["result"]) == (purpose, result)
        assert entry.get("scanned_at") is None
    stamps = [moment(entry["occurred_at"]) for entry in entries]
    assert stamps == sorted(stamps, reverse=True)
    assert len(set(stamps)) == len(stamps)
    assert others_answer["verification_id"] not in {entry["verification_id"] for entry in entries}
    assert [entry["verification_id"] for entry in await usage(client, other)] == [others_answer["verification_id"]]

    # Paging: `limit`, then `before` = the last entry's occurred_at.
    pages: list[list[dict[str, Any]]] = [await usage(client, holder, limit=2)]
    while len(pages[-1]) == 2:
        pages.append(await usage(client, holder, limit=2, before=pages[-1][-1]["occurred_at"]))
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [entry for page in pages for entry in page] == entries
    assert await usage(client, holder, before=entries[-1]["occurred_at"]) == []


async def test_holder_usage_limits_and_authentication(client: httpx.AsyncClient, holder: Holder) -> None:
    for limit in (0, 201, -1):
        response = await client.get("/v1/holder/usage", params={"limit": limit}, auth=holder.auth)
        problem(response, 400)
    response = await client.get("/v1/holder/usage", params={"before": "yesterday"}, auth=holder.auth)
    problem(response, 400)
    assert (await client.get("/v1/holder/usage", params={"limit": 200}, auth=holder.auth)).json() == []
    problem(await client.get("/v1/holder/usage"), 401)


async def test_holder_usage_paging_does_not_skip_scans_uploaded_in_one_batch(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    credentials = [(await factories.credentials(client, holder))[0] for _ in range(3)]
    now = datetime.now(UTC)
    scans = [
        {"credential": credential, "scanned_at": (now - timedelta(seconds=3 - i)).isoformat()}
        for i, credential in enumerate(credentials)
    ]
    response = await client.post("/v1/verify/batch", json={"scans": scans}, headers=gate.headers)
    assert response.status_code == 200, response.text
    assert [item["result"] for item in response.json()["results"]] == ["accepted"] * 3
    await drain(context)

    assert len(await usage(client, holder)) == 3
    seen: list[str] = []
    page = await usage(client, holder, limit=1)
    while page:
        seen += [entry["verification_id"] for entry in page]
        page = await usage(
            client, holder, limit=1, before=page[-1]["occurred_at"], before_id=page[-1]["verification_id"]
        )
    assert len(seen) == 3, "paging one by one shows every scan"


# --- 3. the operator's counts ------------------------------------------------------------------


async def counts(client: httpx.AsyncClient, token: str, organisation_id: str, **params: str) -> httpx.Response:
    """GET …/verification-counts."""
    return await client.get(
        f"/v1/operator/verifier-organisations/{organisation_id}/verification-counts",
        params=params,
        headers=bearer(token),
    )


@dataclass
class CountedOrganisation:
    """An organisation with three terminals (one idle) and the counts its scans should produce."""

    organisation_id: str
    gates: list[Gate]
    expected: dict[str, dict[str, int]] = field(default_factory=dict)  # terminal id → result → count
    started: datetime = field(default_factory=lambda: datetime.now(UTC))


@pytest.fixture
async def counted(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> CountedOrganisation:
    """Scans at two of the organisation's three terminals, drained."""
    started = datetime.now(UTC) - timedelta(seconds=1)
    holder = await factories.activated_holder(client, admin_token, SICHUAN)
    first = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    second = await factories.new_terminal(client, admin_token, first.organisation_id, ["transit"])
    idle = await factories.new_terminal(client, admin_token, first.organisation_id, ["transit"])
    org = CountedOrganisation(first.organisation_id, [first, second, idle], started=started)
    [one] = await factories.credentials(client, holder)
    [two] = await factories.credentials(client, holder)
    [three] = await factories.credentials(client, holder)
    results = [
        (first, one, "accepted"),
        (second, one, "replayed"),
        (first, two, "accepted"),
        (first, "EC1:0", "malformed"),
        (first, expired_credential(context, one), "expired"),
        (second, three, "accepted"),
        (second, "EC1:1", "malformed"),
    ]
    for gate, credential, result in results:
        body = await factories.verify(client, gate, credential)
        assert body.get("reason", body["result"]) == result
        tally = org.expected.setdefault(gate.terminal_id, {})
        tally[result] = tally.get(result, 0) + 1
    await drain(context)
    return org


async def test_operator_counts_every_terminal_by_result(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, counted: CountedOrganisation
) -> None:
    manager = await operator_token(client, context, Role.VERIFIER_MANAGER, [SICHUAN])
    auditor = await operator_token(client, context, Role.AUDITOR, [SICHUAN])
    for token in (admin_token, manager, auditor):
        response = await counts(client, token, counted.organisation_id)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["organisation_id"] == counted.organisation_id
        assert moment(body["until"]) - moment(body["since"]) == timedelta(days=1)
        terminals = {item["terminal_id"]: item for item in body["terminals"]}
        assert set(terminals) == {gate.terminal_id for gate in counted.gates}
        names = [item["name"] for item in body["terminals"]]
        assert names == sorted(names)
        for gate in counted.gates:
            item = terminals[gate.terminal_id]
            by_result = counted.expected.get(gate.terminal_id, {})
            assert item["by_result"] == by_result
            assert item["accepted"] == by_result.get("accepted", 0)
            assert item["rejected"] == sum(by_result.values()) - by_result.get("accepted", 0)
    idle = terminals[counted.gates[2].terminal_id]
    assert (idle["accepted"], idle["rejected"], idle["by_result"]) == (0, 0, {})

    # An explicit window around the scans counts them; one after them counts nothing.
    now = datetime.now(UTC)
    window = await counts(
        client, admin_token, counted.organisation_id,
        since=counted.started.isoformat(), until=(now + timedelta(seconds=1)).isoformat(),
    )  # fmt: skip
    assert window.status_code == 200, window.text
    assert sum(item["accepted"] + item["rejected"] for item in window.json()["terminals"]) == 7
    later = await counts(
        client, admin_token, counted.organisation_id,
        since=(now + timedelta(seconds=1)).isoformat(), until=(now + timedelta(hours=1)).isoformat(),
    )  # fmt: skip
    assert later.status_code == 200, later.text
    assert all(item["by_result"] == {} for item in later.json()["terminals"])
    assert len(later.json()["terminals"]) == 3


async def test_operator_counts_window_given_in_china_time(
    client: httpx.AsyncClient, admin_token: str, counted: CountedOrganisation
) -> None:
    """Beijing time is what a card office's console naturally sends; the same instants, the same counts."""
    china = timedelta(hours=8)
    since = counted.started.astimezone(timezone(china))
    until = (datetime.now(UTC) + timedelta(seconds=1)).astimezone(since.tzinfo)
    response = await counts(
        client, admin_token, counted.organisation_id, since=since.isoformat(), until=until.isoformat()
    )
    assert response.status_code == 200, response.text
    assert sum(item["accepted"] + item["rejected"] for item in response.json()["terminals"]) == 7


async def test_operator_counts_are_region_scoped_and_checked(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, counted: CountedOrganisation
) -> None:
    guangdong = await operator_token(client, context, Role.VERIFIER_MANAGER, ["440000"])
    hidden = await counts(client, guangdong, counted.organisation_id)
    missing = await counts(client, guangdong, str(uuid.uuid4()))
    assert problem(hidden, 404)["code"] == "not_found"
    assert factories.without_request_id(hidden) == factories.without_request_id(missing)
    card_officer = await operator_token(client, context, Role.CARD_OFFICER, [SICHUAN])
    assert problem(await counts(client, card_officer, counted.organisation_id), 403)["code"] == "forbidden"
    problem(await client.get(f"/v1/operator/verifier-organisations/{counted.organisation_id}/verification-counts"), 401)

    now = datetime.now(UTC)
    for since, until in [(now, now), (now, now - timedelta(seconds=1))]:
        response = await counts(
            client, admin_token, counted.organisation_id, since=since.isoformat(), until=until.isoformat()
        )
        assert "since" in problem(response, 400)["detail"]
    problem(await counts(client, admin_token, counted.organisation_id, since="not a time"), 400)


# --- 4. the drain, killed mid-run ----------------------------------------------------------------


@dataclass
class DrainSetup:
    """A fresh database and a Redis prefix of its own, the CLI's environment, and the app's settings."""

    database_url: str
    redis_url: str
    prefix: str
    env: dict[str, str]

    @property
    def streams(self) -> tuple[str, ...]:
        return stream_keys(self.prefix)


@pytest.fixture(params=BACKENDS)
async def drain_setup(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: URL, redis_url: str, redis_prefix: str
) -> AsyncIterator[DrainSetup]:
    """A fresh migrated database of the backend and a stream nobody else writes to."""
    url = await migrated_database(request.param, tmp_path, postgres_url)
    database_url = url.render_as_string(hide_password=False)
    prefix = f"{redis_prefix}drain-{request.param}-{secrets.token_hex(3)}:"
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "ECARD_REDIS_PREFIX": prefix}
    env.pop("ECARD_DRAIN_EVENTS", None)
    yield DrainSetup(database_url, redis_url, prefix, env)
    if request.param == "postgres":
        await _drop_postgres_database(postgres_url, url.database or "")


def cli(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start `litestar ecard …`."""
    return subprocess.Popen(
        [str(VENV_BIN / "litestar"), "--app", "app.asgi:create_app", "ecard", *args],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def cli_output(env: dict[str, str], *args: str) -> str:
    """Run `litestar ecard …` to its end; its stdout (asserting exit status 0)."""
    process = cli(env, *args)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


@dataclass
class Drains:
    """`ecard events drain` processes started by a test, so a failing test leaves none running."""

    env: dict[str, str]
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        """Start a drain: batches of 20, taking over entries a dead drain left idle for 200 ms."""
        process = cli(self.env, "events", "drain", "--batch", "20", "--claim-idle", "200")
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        """SIGKILL those still running."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@dataclass
class Producer:
    """Makes verification events on the app, through /v1/verify and straight into the stream."""

    client: httpx.AsyncClient
    context: ServiceContext
    holders: list[Holder]
    gates: list[Gate]
    # verification id → the result it must be stored with
    produced: dict[str, str] = field(default_factory=dict)
    # verification id → the stream entry's encoded event, for those pushed straight into the stream
    encoded: dict[str, bytes] = field(default_factory=dict)
    online: int = 0

    async def wave(self, direct: int) -> None:
        """Each holder's fresh credential at one gate and again at the next (accepted, replayed), a malformed
        scan per holder, all at once; then `direct` events pushed through the store."""
        credentials = await asyncio.gather(*(factories.credentials(self.client, holder) for holder in self.holders))
        requests = []
        for i, [credential] in enumerate(credentials):
            first, second = self.gates[i % len(self.gates)], self.gates[(i + 1) % len(self.gates)]
            requests += [(first, credential), (second, credential), (second, "EC1:0")]
        answers = await asyncio.gather(
            *(
                self.client.post("/v1/verify", json={"credential": text}, headers=gate.headers)
                for gate, text in requests
            )
        )
        for response in answers:
            assert response.status_code == 200, response.text
            body = response.json()
            self.produced[body["verification_id"]] = body.get("reason") or body["result"]
        assert sum(result == "accepted" for result in self.produced.values()) > 0
        self.online += len(answers)
        await self.push(direct)

    async def push(self, count: int, *, at_once: bool = True) -> None:
        """Events of scans the store decides (unknown cards) or that were decided before it (bad signature).

        At once: concurrently, so the Redis store pipelines them. Otherwise one after the other, so the
        in-process store (which never suspends) appends them all before any other task runs.
        """
        entries = [self.context.directory.authenticate(gate.api_key) for gate in self.gates]
        rate = RateLimit(per_minute=60_000_000, burst=1_000_000)
        scans = []
        for i in range(count):
            terminal = entries[i % len(entries)]
            assert terminal is not None
            verification_id = "vf_" + secrets.token_urlsafe(12)
            now_ms = time.time_ns() // 1_000_000
            card_ref, nonce = os.urandom(16), os.urandom(NONCE_LENGTH)
            record = EventRecord(
                verification_id=verification_id,
                terminal_id=terminal.terminal_id.bytes,
                organisation_id=terminal.organisation_id.bytes,
                at_ms=now_ms,
                channel=ONLINE,
                card_ref=card_ref,
                nonce=nonce,
                card_region=SICHUAN,
                purpose="transit",
            )
            self.encoded[verification_id] = event = encode_event(record)
            store_key = f"push-{terminal.key}"
            if i % 2:
                scan = Scan(store_key, verification_id, rate, now_ms, event, decided="bad_signature")
                self.produced[verification_id] = "bad_signature"
            else:
                scan = Scan(
                    store_key, verification_id, rate, now_ms, event,
                    card_ref=card_ref, nonce=nonce, nonce_ttl=120, retry_window_ms=10_000,
                )  # fmt: skip
                self.produced[verification_id] = "card_unknown"
            scans.append(scan)
        if at_once:
            answers = await asyncio.gather(*(self.context.mirror.scan(scan) for scan in scans))
        else:
            answers = [await self.context.mirror.scan(scan) for scan in scans]
        assert all(answer.kind == "new" for answer in answers)


async def pending(store: redis.Redis, setup: DrainSetup) -> int:
    """Entries delivered to a drain and not acknowledged (0 before the first drain made the groups)."""
    total = 0
    for stream in setup.streams:
        try:
            summary = await store.xpending(stream, GROUP)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            continue
        total += int(summary["pending"])
    return total


async def length(store: redis.Redis, setup: DrainSetup) -> int:
    """Entries in the shards' streams."""
    return sum([await store.xlen(stream) for stream in setup.streams])


def consumer_of(process: subprocess.Popen[bytes]) -> str:
    """The drain process's name in the consumer group (see app.domain.verification.events.consumer_name)."""
    return f"{socket.gethostname()}-{process.pid}"


async def held_by(store: redis.Redis, setup: DrainSetup, process: subprocess.Popen[bytes]) -> int | None:
    """Entries this drain process received and has not acknowledged; None until it first read the streams."""
    name = consumer_of(process)
    held = None
    for stream in setup.streams:
        try:
            consumers = await store.xinfo_consumers(stream, GROUP)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            continue
        for consumer in consumers:
            found = consumer["name"]
            if (found.decode() if isinstance(found, bytes) else found) == name:
                held = (held or 0) + int(consumer["pending"])
    return held


async def wait_until_working(
    store: redis.Redis, setup: DrainSetup, process: subprocess.Popen[bytes], deadline: float, *, holding: bool
) -> bool:
    """Wait until this drain has read the stream (and, if holding, holds unacknowledged entries right now);
    False if it emptied the stream first."""
    while True:
        held = await held_by(store, setup, process)
        if held is not None and (held > 0 or not holding):
            return True
        if held is not None and await length(store, setup) == 0:
            return False
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the drain never took an entry"
        await asyncio.sleep(0.001)


class LostReply:
    """The stream, with the reply of its first read lost: Redis delivered the entries, the client timed out."""

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream
        self.lost: list[StreamEntry] = []

    async def read(self, consumer: str, count: int, block_ms: int) -> list[StreamEntry]:
        entries = await self._stream.read(consumer, count, block_ms)
        if not self.lost:
            self.lost = entries
            raise StreamUnavailable("Timeout reading from the stream")
        return entries

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


async def test_a_drain_whose_read_lost_its_reply_stores_those_entries_at_once(drain_setup: DrainSetup) -> None:
    """A read that timed out after Redis ran it leaves entries delivered to this drain: they are read
    again at the next batch, not left until another drain's claim takes them (30 s by default)."""
    setup = drain_setup
    app = create_app(make_settings(setup.database_url, setup.redis_url, setup.prefix))
    async with serve(app) as client:
        context: ServiceContext = app.state[STATE_KEY]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        response = await client.post(
            "/v1/operator/regions", json={"code": SICHUAN, "name": "四川省"}, headers=bearer(token)
        )
        assert response.status_code == 201, response.text
        holders = [await factories.activated_holder(client, token, SICHUAN) for _ in range(3)]
        organisation = (await factories.new_gate(client, token, SICHUAN, "transit", ["transit"])).organisation_id
        producer = Producer(client, context, holders, [await fast_gate(client, token, organisation, ["transit"])])
        await producer.wave(direct=40)
        drainer = context.event_drain(block_ms=0, claim_idle_ms=600_000)
        lossy = LostReply(drainer.stream)
        drainer.stream = lossy  # type: ignore[assignment]
        with pytest.raises(StreamUnavailable):
            await drainer.run_once()
        assert len(lossy.lost) > 0 and (await context.events.backlog()).pending == len(lossy.lost)
        while await drainer.run_once():
            pass
        assert (await context.events.backlog()).length == 0
        found = await stored(context, list(producer.produced))
        assert {verification_id: row.result for verification_id, row in found.items()} == producer.produced


async def test_drain_killed_mid_run_and_restarted_stores_every_event_exactly_once(drain_setup: DrainSetup) -> None:
    setup = drain_setup
    store = redis.Redis.from_url(setup.redis_url)
    app = create_app(make_settings(setup.database_url, setup.redis_url, setup.prefix))
    drains = Drains(setup.env)
    try:
        async with serve(app) as client:
            context: ServiceContext = app.state[STATE_KEY]
            assert not context.settings.drains_events, "the app must leave the stream to the CLI drain"
            token = await operator_token(client, context, Role.ADMIN, ["*"])
            response = await client.post(
                "/v1/operator/regions", json={"code": SICHUAN, "name": "四川省"}, headers=bearer(token)
            )
            assert response.status_code == 201, response.text
            holders = [await factories.activated_holder(client, token, SICHUAN) for _ in range(12)]
            # The organisation's first terminal keeps the default rate; the load goes to three fast ones.
            organisation = (await factories.new_gate(client, token, SICHUAN, "transit", ["transit"])).organisation_id
            gates = [await fast_gate(client, token, organisation, ["transit"]) for _ in range(3)]
            producer = Producer(client, context, holders, gates)

            await producer.wave(direct=1500)  # a backlog before the first drain starts
            process = drains.start()
            kills = kills_with_pending = 0
            deadline = time.monotonic() + 45
            while kills < 6:
                # More load while the drain works (and while a restarted one starts up).
                production = asyncio.create_task(producer.wave(direct=800))
                try:
                    # Every other kill while the drain holds entries it has not acknowledged; the others
                    # anywhere in its cycle (reading, writing, acknowledging).
                    holding = kills % 2 == 0
                    if await wait_until_working(store, setup, process, deadline, holding=holding):
                        if not holding:
                            await asyncio.sleep(random.uniform(0.001, 0.03))
                        process.send_signal(signal.SIGKILL)
                        process.wait(10)
                        kills += 1
                        if (await held_by(store, setup, process) or 0) > 0:
                            kills_with_pending += 1
                        process = drains.start()
                finally:
                    await production
            assert kills_with_pending >= 1, "no kill caught the drain holding unacknowledged entries"

            # The last drain takes over the dead ones' entries (idle > 200 ms), empties the stream, and stops on
            # SIGTERM between batches.
            while await held_by(store, setup, process) is None or await length(store, setup) > 0:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline + 30, "the restarted drain made no progress"
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=30)
            assert process.returncode == 0, stderr.decode()
            assert stdout.decode().strip() == "stopped"

            # A drain that committed and died before its acknowledgement leaves its entries to be delivered
            # again: 200 copies of stored events (50 of them twice, so one batch holds an event and its copy),
            # stored once more by a single run that stops when the stream is empty.
            copies = list(producer.encoded.items())[:150]
            for verification_id, event in copies + copies[:50]:
                await store.xadd(setup.streams[0], {"e": event, "r": producer.produced[verification_id]})
            summary = cli_output(setup.env, "events", "drain", "--once", "--claim-idle", "0")
            assert summary.strip() == "200 events stored; 0 left in the stream (0 pending)", summary
            assert cli_output(setup.env, "events", "backlog").strip() == "0 events in the stream, 0 pending"
            assert await length(store, setup) == 0
            assert await pending(store, setup) == 0

            # Every produced event exactly once, with its result; nothing else.
            async with context.sessions() as session:
                rows = dict((await session.execute(select(VerificationEvent.id, VerificationEvent.result))).all())
                total = await session.scalar(select(func.count()).select_from(VerificationEvent))
            assert producer.online >= 200
            assert total == len(producer.produced) == len(rows)
            assert rows == producer.produced
    finally:
        drains.kill_all()
        await store.aclose()


# --- 5. the embedded default -------------------------------------------------------------------


@pytest.fixture
async def sqlite_url(tmp_path: Path, postgres_url: URL) -> str:
    """A fresh migrated SQLite database of this test alone."""
    return (await migrated_database("sqlite", tmp_path, postgres_url)).render_as_string()


async def test_embedded_service_drains_in_process_and_stores_the_rest_at_shutdown(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, "", "unused:")
    assert settings.drains_events
    app = create_app(settings)
    async with serve(app) as client:
        context: ServiceContext = app.state[STATE_KEY]
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        response = await client.post(
            "/v1/operator/regions", json={"code": SICHUAN, "name": "四川省"}, headers=bearer(token)
        )
        assert response.status_code == 201, response.text
        holder = await factories.activated_holder(client, token, SICHUAN)
        gate = await factories.new_gate(client, token, SICHUAN, "transit", ["transit"])
        [credential] = await factories.credentials(client, holder)
        answer = await factories.verify(client, gate, credential)
        assert answer["result"] == "accepted"

        # The lifespan's drain stores it within a moment: the holder sees it.
        deadline = time.monotonic() + 3
        while not (entries := await usage(client, holder)):
            assert time.monotonic() < deadline, "the in-process drain did not store the event within 3 s"
            await asyncio.sleep(0.02)
        assert [(entry["verification_id"], entry["result"]) for entry in entries] == [
            (answer["verification_id"], "accepted")
        ]

        # A burst right before shutdown, appended before the drain task can run again: what the drain does
        # not take in its last batch is stored on the way out.
        producer = Producer(
            client, context, [holder], [await fast_gate(client, token, gate.organisation_id, ["transit"])]
        )
        await producer.push(3000, at_once=False)
        pushed = list(producer.produced)
        assert (await context.events.backlog()).length == 3000

    # After the app closed, on a context of its own: every pushed event is in the database, once.
    reader = ServiceContext.build(settings)
    try:
        rows = await stored(reader, pushed)
        assert set(rows) == set(pushed)
        assert {row.result for row in rows.values()} == {"bad_signature", "card_unknown"}
        usage_row = await stored(reader, [answer["verification_id"]])
        assert usage_row[answer["verification_id"]].result == "accepted"
        async with reader.sessions() as session:
            total = await session.scalar(select(func.count()).select_from(VerificationEvent))
            organisations = await session.scalar(select(func.count()).select_from(VerifierOrganisation))
        assert total == len(pushed) + 1
        assert organisations == 1
    finally:
        await reader.close()

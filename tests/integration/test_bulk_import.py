"""Bulk issuance from CSV, as a card office runs it: from the command line and through the console API.

Valid rows become persons, cards and pending eCards readable through the card API; every kind of bad
row lands in the report with its reason and without personal data; the same file twice creates
nothing twice; a CLI run killed mid-file and run again leaves every valid row exactly once; uploads are
region-scoped, role-checked and size-limited.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py); the CLI tests
run `litestar ecard card import` as a subprocess on a fresh migrated database of each backend.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import URL

from app.db.models import ActivationCode, AuditEvent, Card, ECard, ImportJob, ImportRejection, Person
from app.domain.audit.services import Actor
from app.domain.cards.citizen_id import check_character, mask_citizen_id
from app.domain.cards.services import CITIZEN_ID_FIELD, NAME_FIELD, seal_missing_profiles
from app.domain.imports import controllers as import_controllers
from app.domain.imports.services import ImportFileError, ImportResult, import_file, rejection_report
from app.domain.operators.services import Role
from app.domain.regions.services import register_region
from app.domain.verification.disclosure import Profile, profile_field, unpack_profile
from app.server.context import ServiceContext
from app.settings import PROJECT_ROOT
from tests import factories
from tests.conftest import BACKENDS, _drop_postgres_database, make_settings, migrated_database, operator_token
from tests.factories import bearer

PROBLEM_JSON = "application/problem+json"
SICHUAN, CHONGQING = "510000", "500000"
HEADER = "region,citizen_id,name,card_number"
VENV_BIN = Path(sys.executable).parent
ACTOR = Actor.command("test")


# --- helpers ---------------------------------------------------------------------------------


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The RFC 9457 body of an error response, after checking its status and media type."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers["content-type"]
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


def csv_text(rows: list[str], *, bom: bool = False, header: str = HEADER) -> bytes:
    """A CSV file of the given lines after the header, CRLF-terminated."""
    return (("\ufeff" if bom else "") + "\r\n".join([header, *rows]) + "\r\n").encode()


def line(region: str, citizen_id: str, name: str, card_number: str) -> str:
    """One CSV line (the test values need no quoting)."""
    return f"{region},{citizen_id},{name},{card_number}"


_prefixes = itertools.count()
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def card_prefix() -> str:
    """Three letters that start every card number of one test and of no other card of the session (the
    factories' numbers start with T, these with I), so a test can count its own cards exactly."""
    n = next(_prefixes)
    return "I" + _LETTERS[n // len(_LETTERS) % len(_LETTERS)] + _LETTERS[n % len(_LETTERS)]


def born(region: str, birth: str) -> str:
    """A citizen ID with the right check character and the given (possibly impossible) YYYYMMDD birth date."""
    first17 = f"{region}{birth}{secrets.randbelow(1000):03d}"
    return first17 + check_character(first17)


def wrong_check(citizen_id: str) -> str:
    """The same number with another check character."""
    return citizen_id[:17] + next(c for c in "0123456789X" if c != citizen_id[17])


def unregistered_region() -> str:
    """A well-formed region code no test registers (with overwhelming likelihood)."""
    while True:
        code = f"{1 + secrets.randbelow(9)}{secrets.randbelow(10**5):05d}"
        if code not in factories.REGIONS:
            return code


async def run(
    context: ServiceContext, tmp_path: Path, content: bytes, regions: list[str] | None = None
) -> ImportResult:
    """Import content as the CLI does (in this process), in regions (default: all)."""
    path = tmp_path / f"{uuid.uuid4().hex}.csv"
    path.write_bytes(content)
    return await import_file(context.sessions, context.pii, path, ACTOR, regions=regions or ["*"], chunk_rows=7)


async def report(context: ServiceContext, job_id: uuid.UUID) -> list[dict[str, str]]:
    """The job's rejected-row report, parsed."""
    text = "".join([piece async for piece in rejection_report(context.sessions, job_id)])
    return list(csv.DictReader(io.StringIO(text)))


async def count_cards(context: ServiceContext, prefix: str) -> tuple[int, int, int]:
    """(cards, eCards, persons of those cards) whose card number starts with prefix."""
    async with context.sessions() as session:
        numbers = Card.card_number.like(f"{prefix}%")
        cards = await session.scalar(select(func.count()).select_from(Card).where(numbers))
        ecards = await session.scalar(select(func.count()).select_from(ECard).join(Card).where(numbers))
        persons = await session.scalar(select(func.count(func.distinct(Card.person_id))).where(numbers))
    return cards or 0, ecards or 0, persons or 0


async def card_id_of(context: ServiceContext, number: str) -> uuid.UUID:
    """The id of the card with this number."""
    async with context.sessions() as session:
        card_id = await session.scalar(select(Card.id).where(Card.card_number == number))
    assert card_id is not None, number
    return card_id


async def registered_without_a_card_in_use(
    context: ServiceContext, tmp_path: Path, citizen_id: str, number: str
) -> Card:
    """A person of Sichuan registered by an import of one row, whose card is then revoked: they hold no
    card in use, so a later row may give them a new one. Their revoked card."""
    first = await run(context, tmp_path, csv_text([line(SICHUAN, citizen_id, "张三", number)]))
    assert first.progress.created == 1
    async with context.sessions() as session:
        card = await session.scalar(select(Card).where(Card.card_number == number))
        assert card is not None
        card.state = "revoked"
        await session.commit()
    return card


async def persons_with(context: ServiceContext, citizen_id: str) -> int:
    """How many persons have this citizen ID."""
    index = context.pii.blind_index(citizen_id, CITIZEN_ID_FIELD)
    async with context.sessions() as session:
        count = await session.scalar(select(func.count()).select_from(Person).where(Person.citizen_id_index == index))
    return count or 0


def assert_no_personal_data(text: str, citizen_ids: list[str], names: list[str]) -> None:
    """Neither a citizen ID nor a name appears in text, in whole or as a 10-character run."""
    for citizen_id in citizen_ids:
        assert citizen_id not in text
        assert citizen_id[4:14] not in text, "the middle of a citizen ID leaked"
    for name in names:
        assert name not in text


def files_in(directory: Path) -> list[Path]:
    """The files in directory."""
    return list(directory.iterdir())


async def upload(client: httpx.AsyncClient, token: str, content: bytes) -> httpx.Response:
    """POST a CSV file to /v1/operator/imports."""
    return await client.post(
        "/v1/operator/imports", content=content, headers={**bearer(token), "Content-Type": "text/csv; charset=utf-8"}
    )


async def wait_for_job(client: httpx.AsyncClient, token: str, job_id: str) -> dict[str, Any]:
    """Poll the job until it ends; its final state."""
    deadline = time.monotonic() + 60
    while True:
        response = await client.get(f"/v1/operator/imports/{job_id}", headers=bearer(token))
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def sichuan_officer(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """A card officer of Sichuan only."""
    return await operator_token(client, context, Role.CARD_OFFICER, [SICHUAN])


@pytest.fixture(scope="module")
async def chongqing_officer(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """A card officer of Chongqing only."""
    return await operator_token(client, context, Role.CARD_OFFICER, [CHONGQING])


# --- rows created ----------------------------------------------------------------------------


async def test_valid_rows_become_pending_cards_without_activation_code(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, tmp_path: Path
) -> None:
    prefix = card_prefix()
    rows = [
        (SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}000001"),
        (SICHUAN, factories.citizen_id(SICHUAN).lower(), " 李四 ", f"{prefix.lower()}000002"),
        (CHONGQING, factories.citizen_id(CHONGQING), "王五", f"{prefix}000003"),
    ]
    result = await run(context, tmp_path, csv_text([line(*row) for row in rows], bom=True))
    assert (result.progress.rows, result.progress.created) == (3, 3)
    assert (result.progress.already_present, result.progress.rejected) == (0, 0)
    assert await count_cards(context, prefix) == (3, 3, 3)

    for region, citizen_id, name, number in rows:
        card_id = await card_id_of(context, number.upper())
        response = await client.get(f"/v1/operator/cards/{card_id}", headers=bearer(admin_token))
        assert response.status_code == 200, response.text
        card = response.json()
        assert card["card_number"] == number.upper()
        assert card["region"] == region
        assert card["card_state"] == "issued"
        assert card["ecard_state"] == "pending_activation"
        assert card["holder_name"] == name.strip()[0] + "*"
        assert card["citizen_id"] == citizen_id.upper()[:4] + "*" * 10 + citizen_id.upper()[-4:]
        async with context.sessions() as session:
            codes = await session.scalar(
                select(func.count()).select_from(ActivationCode).join(ECard).where(ECard.card_id == card_id)
            )
        assert codes == 0

    # The office hands a card over: a code issued one at a time, then the holder activates.
    card_id = await card_id_of(context, rows[0][3])
    response = await client.post(f"/v1/operator/cards/{card_id}/activation-code", headers=bearer(admin_token))
    assert response.status_code == 201, response.text
    await factories.activate(client, rows[0][3], response.json()["activation_code"])
    response = await client.get(f"/v1/operator/cards/{card_id}", headers=bearer(admin_token))
    assert response.json()["ecard_state"] == "active"

    # The import is in the audit log: who started it, and what it did.
    async with context.sessions() as session:
        actions = set(
            await session.scalars(select(AuditEvent.action).where(AuditEvent.subject_id == str(result.job_id)))
        )
    assert actions == {"import.started", "import.finished"}


async def test_every_kind_of_bad_row_is_reported_with_its_reason(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, tmp_path: Path
) -> None:
    prefix = card_prefix()
    taken = (await factories.issue_card(client, admin_token, SICHUAN))["card"]["card_number"]
    holder_id = factories.citizen_id(SICHUAN)
    response = await client.post(
        "/v1/operator/cards",
        json={"region": SICHUAN, "citizen_id": holder_id, "name": "赵六", "card_number": f"{prefix}999999"},
        headers=bearer(admin_token),
    )
    assert response.status_code == 201, response.text
    good = factories.citizen_id(SICHUAN)
    repeated_person = factories.citizen_id(SICHUAN)
    misplaced = factories.citizen_id(SICHUAN)
    fresh = [factories.citizen_id(SICHUAN) for _ in range(12)]
    unknown = unregistered_region()
    # line number in the file → (CSV line, expected reason, expected card number in the report)
    cases: dict[int, tuple[str, str, str]] = {
        2: (line(SICHUAN, good, "张三", f"{prefix}000001"), "", ""),
        3: (line(SICHUAN, wrong_check(fresh[0]), "张三", f"{prefix}000002"),
            "citizen ID check character does not match", f"{prefix}000002"),
        4: (line(SICHUAN, born(SICHUAN, "19900230"), "张三", f"{prefix}000003"),
            "citizen ID holds an impossible birth date", f"{prefix}000003"),
        5: (line(SICHUAN, fresh[1][:17], "张三", f"{prefix}000004"),
            "citizen ID must be 17 digits followed by a digit or X", f"{prefix}000004"),
        6: (line(SICHUAN, fresh[2], "张三", f"{prefix}00005"),
            "card number must be 9 letters or digits", f"{prefix[:2]}****05"),
        7: (line(SICHUAN, fresh[3], "张三", misplaced),
            "card number must be 9 letters or digits", misplaced[:2] + "*" * 14 + misplaced[-2:]),
        8: (line(unknown, fresh[4], "张三", f"{prefix}000006"),
            f"region {unknown} is not registered", f"{prefix}000006"),
        9: (line("51000", fresh[5], "张三", f"{prefix}000007"),
            "region must be a 6-digit GB/T 2260 code", f"{prefix}000007"),
        10: (line(SICHUAN, fresh[6], "", f"{prefix}000008"), "name must not be empty", f"{prefix}000008"),
        11: (f"{SICHUAN},{fresh[7]},张三", "expected 4 fields, found 3", ""),
        12: (line(SICHUAN, fresh[8], "张三", f"{prefix}000001"), "card number repeats line 2", f"{prefix}000001"),
        13: (line(SICHUAN, good, "张三", f"{prefix}000009"),
             "the same citizen ID is on line 2; a person holds one card", f"{prefix}000009"),
        14: (line(SICHUAN, fresh[9], "张三", taken), "card number is already issued to another person", taken),
        15: (line(SICHUAN, holder_id, "赵六", f"{prefix}000010"),
             "this person already holds a card in use", f"{prefix}000010"),
        16: (line(SICHUAN, fresh[10], '"张\n三"', f"{prefix}000011"), "name holds control characters",
             f"{prefix}000011"),
        18: (line(SICHUAN, repeated_person, "张三", f"{prefix}000012"), "", ""),
    }  # fmt: skip
    # The last line's name is not UTF-8.
    content = csv_text([case[0] for case in cases.values()])
    content += f"{SICHUAN},{fresh[11]},".encode() + b"\xff\xfe" + f",{prefix}000013\r\n".encode()
    cases[19] = ("", "name is not valid UTF-8", f"{prefix}000013")

    result = await run(context, tmp_path, content)
    expected = {number: (reason, shown) for number, (_, reason, shown) in cases.items() if reason}
    assert result.progress.rows == len(cases)
    assert result.progress.created == 2
    assert result.progress.already_present == 0
    assert result.progress.rejected == len(expected)

    rejected = await report(context, result.job_id)
    assert {int(row["line"]): (row["reason"], row["card_number"]) for row in rejected} == expected
    text = "".join([piece async for piece in rejection_report(context.sessions, result.job_id)])
    assert_no_personal_data(text, [good, holder_id, misplaced, repeated_person, *fresh], ["张三", "赵六"])

    # Nothing of a rejected row was written; the good rows were.
    for citizen_id in fresh:
        assert await persons_with(context, citizen_id) == 0
    assert await persons_with(context, good) == 1
    assert await persons_with(context, holder_id) == 1
    assert await count_cards(context, prefix) == (3, 3, 3)  # two imported, one issued before


async def test_rows_outside_the_scope_are_rejected(context: ServiceContext, tmp_path: Path) -> None:
    prefix = card_prefix()
    chongqing_id = factories.citizen_id(CHONGQING)
    content = csv_text(
        [
            line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}000001"),
            line(CHONGQING, chongqing_id, "李四", f"{prefix}000002"),
        ]
    )
    result = await run(context, tmp_path, content, regions=[SICHUAN])
    assert (result.progress.created, result.progress.rejected) == (1, 1)
    assert await report(context, result.job_id) == [
        {"line": "3", "card_number": f"{prefix}000002", "reason": "region 500000 is outside this import's scope"}
    ]
    assert await persons_with(context, chongqing_id) == 0


# --- idempotency -----------------------------------------------------------------------------


async def test_the_same_file_twice_creates_nothing_twice(context: ServiceContext, tmp_path: Path) -> None:
    prefix = card_prefix()
    rows = [line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}{i:06d}") for i in range(40)]
    rows += [line(SICHUAN, wrong_check(factories.citizen_id(SICHUAN)), "张三", f"{prefix}900000")]
    rows += [rows[5].replace("张三", "张三丰")]  # the same card and person again: an in-file duplicate
    content = csv_text(rows)

    first = await run(context, tmp_path, content)
    second = await run(context, tmp_path, content)
    assert (first.progress.created, first.progress.already_present, first.progress.rejected) == (40, 0, 2)
    assert (second.progress.created, second.progress.already_present, second.progress.rejected) == (0, 40, 2)
    assert await count_cards(context, prefix) == (40, 40, 40)
    # Six chunks of 7, two written at once on PostgreSQL: each adds its counts to the job's row as it commits.
    async with context.sessions() as session:
        for result in (first, second):
            job = await session.get(ImportJob, result.job_id)
            assert job is not None
            recorded = (job.rows_processed, job.created, job.already_present, job.rejected, job.bytes_processed)
            progress = result.progress
            assert recorded == (42, progress.created, progress.already_present, progress.rejected, len(content))
    assert await report(context, first.job_id) == await report(context, second.job_id)


async def test_two_imports_of_one_file_at_once_create_each_row_once(context: ServiceContext, tmp_path: Path) -> None:
    # Both classify the same rows as new; whichever commits second meets the first's rows (a unique
    # violation, or the region's lock on PostgreSQL) and classifies its chunk again.
    prefix = card_prefix()
    rows = [line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}{i:06d}") for i in range(60)]
    content = csv_text(rows)
    results = await asyncio.gather(run(context, tmp_path, content), run(context, tmp_path, content))
    assert sum(result.progress.created for result in results) == 60
    assert sum(result.progress.already_present for result in results) == 60
    assert all(result.progress.rejected == 0 for result in results)
    assert await count_cards(context, prefix) == (60, 60, 60)


async def test_imported_rows_get_ids_of_their_own(context: ServiceContext, tmp_path: Path) -> None:
    prefix = card_prefix()
    rows = [
        line((SICHUAN, CHONGQING)[i % 3 == 0], factories.citizen_id(SICHUAN), "张三", f"{prefix}{i:06d}")
        for i in range(30)
    ]
    await run(context, tmp_path, csv_text(rows))
    async with context.sessions() as session:
        found = (
            await session.execute(
                select(Card.card_number, ECard.region_code, ECard.id, Card.id, Person.id)
                .join(ECard, ECard.card_id == Card.id)
                .join(Person, Person.id == Card.person_id)
                .where(Card.card_number.like(f"{prefix}%"))
                .order_by(Card.card_number)
            )
        ).all()
    assert len(found) == 30
    assert [region for _, region, *_ in found] == [(SICHUAN, CHONGQING)[i % 3 == 0] for i in range(30)]
    # New ids are UUIDs (v7, time-ordered, on PostgreSQL's bulk path; v4 on SQLite's), none reused.
    ids = [identifier for *_, ecard_id, card_id, person_id in found for identifier in (ecard_id, card_id, person_id)]
    assert len(set(ids)) == len(ids)
    expected_version = 7 if context.engine.dialect.name == "postgresql" else 4
    assert {identifier.version for identifier in ids} == {expected_version}
    assert {identifier.variant for identifier in ids} == {uuid.RFC_4122}


async def test_a_card_issued_before_to_the_same_person_is_already_present(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, tmp_path: Path
) -> None:
    citizen_id, number = factories.citizen_id(SICHUAN), factories.card_number()
    response = await client.post(
        "/v1/operator/cards",
        json={"region": SICHUAN, "citizen_id": citizen_id, "name": "张三", "card_number": number},
        headers=bearer(admin_token),
    )
    assert response.status_code == 201, response.text
    code = response.json()["activation_code"]

    result = await run(context, tmp_path, csv_text([line(SICHUAN, citizen_id, "张三", number)]))
    assert (result.progress.created, result.progress.already_present, result.progress.rejected) == (0, 1, 0)
    # The card's pending activation code was left alone.
    await factories.activate(client, number, code)


async def test_imported_ecards_keep_their_profile_sealed_from_the_row(
    context: ServiceContext, tmp_path: Path, admin_token: str
) -> None:
    """A row that registers its person seals the eCard's profile from its own data, so the mirror's
    first fill seals nothing; a registered person's new eCard waits to be sealed from what is stored
    (the file's name may differ from it), as before."""
    prefix = card_prefix()
    registered, new = factories.citizen_id(SICHUAN), factories.citizen_id(CHONGQING)
    await registered_without_a_card_in_use(context, tmp_path, registered, f"{prefix}000001")
    rows = [line(SICHUAN, registered, "张叁", f"{prefix}000002"), line(CHONGQING, new, " 王五 ", f"{prefix}000003")]
    result = await run(context, tmp_path, csv_text(rows))
    assert (result.progress.created, result.progress.rejected) == (2, 0)

    async def ecard_of(number: str) -> ECard:
        async with context.sessions() as session:
            ecard = await session.scalar(select(ECard).join(Card).where(Card.card_number == number))
        assert ecard is not None
        return ecard

    for number, citizen_id, name, region in [(f"{prefix}000001", registered, "张三", SICHUAN),
                                              (f"{prefix}000003", new, "王五", CHONGQING)]:  # fmt: skip
        ecard = await ecard_of(number)
        assert ecard.sealed_profile is not None, number
        profile = unpack_profile(context.pii.decrypt_bytes(ecard.sealed_profile, profile_field(ecard.card_ref)))
        assert profile == Profile(name, mask_citizen_id(citizen_id), region)
    again = await ecard_of(f"{prefix}000002")
    assert again.sealed_profile is None
    async with context.sessions() as session:
        sealed = await seal_missing_profiles(session, context.pii, [again.id])
        await session.commit()
    profile = unpack_profile(context.pii.decrypt_bytes(sealed[again.id], profile_field(again.card_ref)))
    assert profile.name == "张三", "sealed from the stored person, not the file's other spelling"


@pytest.mark.parametrize("writers", [1, 5])
async def test_any_number_of_writers_imports_each_row_once(
    context: ServiceContext, tmp_path: Path, admin_token: str, writers: int
) -> None:
    """`ecard card import --writers N`: N chunks in flight on PostgreSQL (SQLite writes one at a time);
    the counts, and what is in the database, are the same whatever N."""
    prefix = card_prefix()
    rows = [line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}{i:06d}") for i in range(1, 61)]
    rows.insert(40, rows[5])  # the same row again, in a later chunk: rejected as a repeat
    path = tmp_path / "cards.csv"
    path.write_bytes(csv_text(rows))
    result = await import_file(context.sessions, context.pii, path, ACTOR, regions=["*"], chunk_rows=7, writers=writers)
    assert (result.progress.rows, result.progress.created, result.progress.rejected) == (61, 60, 1)
    assert await count_cards(context, prefix) == (60, 60, 60)
    async with context.sessions() as session:
        job = await session.get(ImportJob, result.job_id)
    assert job is not None and (job.status, job.rows_processed, job.created, job.rejected) == ("succeeded", 61, 60, 1)

    again = await import_file(context.sessions, context.pii, path, ACTOR, regions=["*"], chunk_rows=7, writers=writers)
    assert (again.progress.created, again.progress.already_present) == (0, 60)


async def test_writers_out_of_range_are_refused_before_any_job(context: ServiceContext, tmp_path: Path) -> None:
    path = tmp_path / "cards.csv"
    path.write_bytes(csv_text([line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{card_prefix()}000001")]))
    async with context.sessions() as session:
        jobs = await session.scalar(select(func.count()).select_from(ImportJob))
    for writers in (0, 9):
        with pytest.raises(ValueError, match="writers must be 1 to 8"):
            await import_file(context.sessions, context.pii, path, ACTOR, regions=["*"], writers=writers)
    async with context.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ImportJob)) == jobs


# --- whole-file errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "the file is empty", id="empty"),
        pytest.param(b"region,citizen_id,card_number\r\n", "missing: name", id="missing-column"),
        pytest.param(b"region,name,name,citizen_id,card_number\r\n", "names name more than once", id="repeated"),
    ],
)
async def test_a_file_without_a_usable_header_fails_its_job(
    context: ServiceContext, tmp_path: Path, content: bytes, message: str
) -> None:
    with pytest.raises(ImportFileError, match=message):
        await run(context, tmp_path, content)
    async with context.sessions() as session:
        job = await session.scalar(select(ImportJob).order_by(ImportJob.created_at.desc()).limit(1))
    assert job is not None
    assert job.status == "failed"
    assert message in (job.error or "")


async def test_a_broken_line_stops_the_file_and_keeps_the_chunks_before(
    context: ServiceContext, tmp_path: Path
) -> None:
    prefix = card_prefix()
    rows = [line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}{i:06d}") for i in range(30)]
    broken = csv_text([*rows[:20], "x" * 5000, *rows[20:]])
    with pytest.raises(ImportFileError, match="line 22 is longer than 4096 bytes"):
        await run(context, tmp_path, broken)
    # Chunks of 7 rows: the first two chunks (14 rows) were committed, the third was not complete.
    assert await count_cards(context, prefix) == (14, 14, 14)

    fixed = await run(context, tmp_path, csv_text(rows))
    assert (fixed.progress.created, fixed.progress.already_present) == (16, 14)
    assert await count_cards(context, prefix) == (30, 30, 30)


# --- the console API -------------------------------------------------------------------------


async def test_upload_imports_in_the_background_with_a_report(
    client: httpx.AsyncClient,
    context: ServiceContext,
    sichuan_officer: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(import_controllers, "UPLOAD_DIR", tmp_path)
    prefix = card_prefix()
    ids = [factories.citizen_id(SICHUAN) for _ in range(25)]
    rows = [line(SICHUAN, citizen_id, "张三", f"{prefix}{i:06d}") for i, citizen_id in enumerate(ids)]
    rows[3] = line(SICHUAN, wrong_check(ids[3]), "张三", f"{prefix}000003")
    rows[7] = line(CHONGQING, factories.citizen_id(CHONGQING), "张三", f"{prefix}000007")
    content = csv_text(rows, bom=True)

    response = await upload(client, sichuan_officer, content)
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["status"] in ("pending", "running")
    assert started["source"] == "api"
    assert started["regions"] == [SICHUAN]
    assert started["size_bytes"] == len(content)

    job = await wait_for_job(client, sichuan_officer, started["id"])
    assert job["status"] == "succeeded", job
    assert (job["rows_processed"], job["created"], job["already_present"], job["rejected"]) == (25, 23, 0, 2)
    assert job["bytes_processed"] == len(content)
    assert job["finished_at"] is not None
    assert "error" not in job

    response = await client.get(f"/v1/operator/imports/{job['id']}/rejections", headers=bearer(sichuan_officer))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    assert list(csv.DictReader(io.StringIO(response.text))) == [
        {"line": "5", "card_number": f"{prefix}000003", "reason": "citizen ID check character does not match"},
        {"line": "9", "card_number": f"{prefix}000007", "reason": "region 500000 is outside this import's scope"},
    ]
    assert_no_personal_data(response.text, ids, ["张三"])
    assert await count_cards(context, prefix) == (23, 23, 23)

    # The same file again: nothing twice.
    again = await wait_for_job(client, sichuan_officer, (await upload(client, sichuan_officer, content)).json()["id"])
    assert (again["created"], again["already_present"], again["rejected"]) == (0, 23, 2)
    assert again["file_sha256"] == job["file_sha256"]
    assert await count_cards(context, prefix) == (23, 23, 23)
    # The uploaded files, with personal data in clear, are removed once imported.
    for _ in range(100):
        if not files_in(tmp_path):
            break
        await asyncio.sleep(0.02)
    assert files_in(tmp_path) == []


async def test_an_upload_that_breaks_mid_file_ends_failed_with_the_reason(
    client: httpx.AsyncClient, context: ServiceContext, sichuan_officer: str
) -> None:
    prefix = card_prefix()
    rows = [line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}{i:06d}") for i in range(3)]
    response = await upload(client, sichuan_officer, csv_text([*rows, "x" * 5000]))
    assert response.status_code == 202, response.text
    job = await wait_for_job(client, sichuan_officer, response.json()["id"])
    assert job["status"] == "failed"
    assert job["error"] == "line 5 is longer than 4096 bytes: not a card file"
    # The rows before it shared the broken chunk: none was committed.
    assert (job["rows_processed"], job["created"]) == (0, 0)
    assert await count_cards(context, prefix) == (0, 0, 0)


async def test_jobs_are_seen_only_within_their_regions(
    client: httpx.AsyncClient,
    context: ServiceContext,
    admin_token: str,
    sichuan_officer: str,
    chongqing_officer: str,
    tmp_path: Path,
) -> None:
    content = csv_text([line(SICHUAN, factories.citizen_id(SICHUAN), "张三", factories.card_number())])
    job = await wait_for_job(client, sichuan_officer, (await upload(client, sichuan_officer, content)).json()["id"])
    sichuan_auditor = await operator_token(client, context, Role.AUDITOR, [SICHUAN])
    both = await operator_token(client, context, Role.CARD_OFFICER, [SICHUAN, CHONGQING])
    for token in (admin_token, sichuan_auditor, both):
        for path in (f"/v1/operator/imports/{job['id']}", f"/v1/operator/imports/{job['id']}/rejections"):
            assert (await client.get(path, headers=bearer(token))).status_code == 200, path

    # Outside its regions a job answers exactly like a missing one.
    for path in ("/v1/operator/imports/{id}", "/v1/operator/imports/{id}/rejections"):
        hidden = await client.get(path.format(id=job["id"]), headers=bearer(chongqing_officer))
        missing = await client.get(path.format(id=uuid.uuid4()), headers=bearer(chongqing_officer))
        assert problem(hidden, 404)["code"] == "not_found"
        assert factories.without_request_id(hidden) == factories.without_request_id(missing)

    # A command-line import (all regions) is for all-region operators only.
    cli_job = await run(context, tmp_path, content)
    hidden = await client.get(f"/v1/operator/imports/{cli_job.job_id}", headers=bearer(both))
    assert problem(hidden, 404)["code"] == "not_found"
    seen = await client.get(f"/v1/operator/imports/{cli_job.job_id}", headers=bearer(admin_token))
    assert seen.status_code == 200
    assert (seen.json()["source"], seen.json()["already_present"]) == ("cli", 1)


@pytest.mark.parametrize("role", [Role.AUDITOR, Role.VERIFIER_MANAGER])
async def test_only_card_officers_upload(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, role: Role
) -> None:
    token = await operator_token(client, context, role, [SICHUAN])
    prefix = card_prefix()
    content = csv_text([line(SICHUAN, factories.citizen_id(SICHUAN), "张三", f"{prefix}000001")])
    assert problem(await upload(client, token, content), 403)["code"] == "forbidden"
    assert await count_cards(context, prefix) == (0, 0, 0)
    if role is Role.VERIFIER_MANAGER:
        response = await client.get(f"/v1/operator/imports/{uuid.uuid4()}", headers=bearer(token))
        assert problem(response, 403)["code"] == "forbidden"


async def test_upload_needs_a_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/operator/imports", content=csv_text([]), headers={"Content-Type": "text/csv"})
    assert problem(response, 401)["code"] == "unauthorized"


async def test_upload_must_be_csv_with_a_header(client: httpx.AsyncClient, sichuan_officer: str) -> None:
    content = csv_text([line(SICHUAN, factories.citizen_id(SICHUAN), "张三", factories.card_number())])
    response = await client.post(
        "/v1/operator/imports", content=content, headers={**bearer(sichuan_officer), "Content-Type": "text/plain"}
    )
    assert problem(response, 415)["code"] == "unsupported_media_type"
    response = await upload(client, sichuan_officer, content.split(b"\r\n", 1)[1])
    body = problem(response, 400)
    assert "missing: region, citizen_id, name, card_number" in body["detail"]


async def test_oversized_upload_is_a_413_and_leaves_no_file(
    client: httpx.AsyncClient, sichuan_officer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(import_controllers, "UPLOAD_DIR", tmp_path)
    limit = import_controllers.MAX_UPLOAD_BYTES
    head = csv_text([])

    # Announced by Content-Length: refused before anything is read.
    response = await upload(client, sichuan_officer, head + b"x" * (limit + 1 - len(head)))
    assert problem(response, 413)["code"] == "payload_too_large"

    # Streamed without a length: refused once the limit is passed, the partial file removed.
    async def chunks() -> AsyncIterator[bytes]:
        yield head
        block = b"y" * (1 << 20)
        for _ in range(limit // len(block) + 1):
            yield block

    response = await client.post(
        "/v1/operator/imports", content=chunks(), headers={**bearer(sichuan_officer), "Content-Type": "text/csv"}
    )
    assert problem(response, 413)["code"] == "payload_too_large"
    assert files_in(tmp_path) == []


# --- the command line, killed mid-file -------------------------------------------------------


@dataclass
class GeneratedFile:
    """A generated import file and what a correct import makes of it."""

    path: Path
    valid: dict[str, str] = field(default_factory=dict)  # card number → citizen ID
    invalid_lines: set[int] = field(default_factory=set)


def generate_file(path: Path, rows: int, prefix: str) -> GeneratedFile:
    """Rows of both test regions with distinct people; every 97th has a bad check character, and every
    101st repeats the card number of the last valid row before it."""
    generated = GeneratedFile(path)
    last_valid_number = ""
    with path.open("w", encoding="utf-8", newline="") as stream:
        stream.write(HEADER + "\r\n")
        for i in range(rows):
            region = (SICHUAN, CHONGQING)[i % 2]
            first17 = f"{region}{1950 + i // 336 % 60}{1 + i // 28 % 12:02d}{1 + i % 28:02d}{i // 20160 % 1000:03d}"
            citizen_id = first17 + check_character(first17)
            number = f"{prefix}{i:06d}"
            if i % 97 == 50:
                citizen_id = wrong_check(citizen_id)
                generated.invalid_lines.add(i + 2)
            elif i % 101 == 60 and last_valid_number:
                number = last_valid_number
                generated.invalid_lines.add(i + 2)
            else:
                generated.valid[number] = citizen_id
                last_valid_number = number
            stream.write(f"{region},{citizen_id},张{chr(0x4E00 + i % 20000)},{number}\r\n")
    return generated


@pytest.fixture(params=BACKENDS)
async def cli_database(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: URL, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[dict[str, str], ServiceContext]]:
    """A fresh migrated database with the test regions: the CLI's environment, and a context on it."""
    url = await migrated_database(request.param, tmp_path, postgres_url)
    database_url = url.render_as_string(hide_password=False)
    context = ServiceContext.build(make_settings(database_url, redis_url, f"{redis_prefix}import:"))
    async with context.sessions() as session:
        for code, name in factories.REGIONS.items():
            await register_region(session, context.pii, ACTOR, code, name)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "ECARD_REDIS_PREFIX": f"{redis_prefix}import:",
    }
    yield env, context
    await context.close()
    if request.param == "postgres":
        await _drop_postgres_database(postgres_url, url.database or "")


def cli_import(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start `litestar ecard card import …`."""
    return subprocess.Popen(
        [str(VENV_BIN / "litestar"), "--app", "app.asgi:create_app", "ecard", "card", "import", *args],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


async def cli_job(context: ServiceContext) -> ImportJob | None:
    """The newest import job."""
    async with context.sessions() as session:
        job: ImportJob | None = await session.scalar(select(ImportJob).order_by(ImportJob.created_at.desc()).limit(1))
    return job


async def test_cli_killed_mid_file_and_run_again_imports_every_valid_row_once(
    cli_database: tuple[dict[str, str], ServiceContext], tmp_path: Path
) -> None:
    env, context = cli_database
    total = 20_000
    generated = generate_file(tmp_path / "cards.csv", total, card_prefix())
    path = str(generated.path)

    process = cli_import(env, path, "--chunk-size", "500")
    deadline = time.monotonic() + 120
    while True:
        job = await cli_job(context)
        if job is not None and job.rows_processed >= 2000:
            break
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the import made no progress"
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    killed = await cli_job(context)
    assert killed is not None
    assert killed.status == "running"
    assert 0 < killed.rows_processed < total, "the import was not killed mid-file"
    assert killed.rows_processed % 500 == 0
    committed = killed.created
    assert (await count_cards(context, "")) == (committed, committed, committed)

    report_path = tmp_path / "rejected.csv"
    process = cli_import(env, path, "--report", str(report_path))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()
    summary = re.search(
        r"(\d+) rows in [\d.]+ s \((\d+) rows/s\): (\d+) created, (\d+) already present, (\d+) rejected",
        stdout.decode(),
    )
    assert summary is not None, stdout.decode()
    rows, _rate, created, already_present, rejected = map(int, summary.groups())
    assert rows == total
    assert already_present == committed
    assert created == len(generated.valid) - committed
    assert rejected == len(generated.invalid_lines)

    # Every valid row exactly once, for the right person; nothing of the invalid ones.
    valid = len(generated.valid)
    assert await count_cards(context, "") == (valid, valid, valid)
    async with context.sessions() as session:
        stored = dict(
            (
                await session.execute(
                    select(Card.card_number, Person.citizen_id_index).join(Person, Person.id == Card.person_id)
                )
            ).all()
        )
        persons = await session.scalar(select(func.count()).select_from(Person))
    assert persons == valid
    assert {number: bytes(index) for number, index in stored.items()} == {
        number: context.pii.blind_index(citizen_id, CITIZEN_ID_FIELD) for number, citizen_id in generated.valid.items()
    }
    with report_path.open(encoding="utf-8", newline="") as stream:
        reported = list(csv.DictReader(stream))
    assert {int(row["line"]) for row in reported} == generated.invalid_lines
    assert "\u5f20" not in report_path.read_text(encoding="utf-8")  # no name (张…) in the report

    # A third run changes nothing.
    process = cli_import(env, path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()
    assert f"0 created, {valid} already present, {len(generated.invalid_lines)} rejected" in stdout.decode()
    assert await count_cards(context, "") == (valid, valid, valid)
    async with context.sessions() as session:
        rejections = await session.scalar(select(func.count()).select_from(ImportRejection))
    # The killed run's rejections of committed chunks, and two full reports.
    assert rejections is not None and rejections >= 2 * len(generated.invalid_lines)


def test_generated_file_is_what_the_crash_test_expects(tmp_path: Path) -> None:
    generated = generate_file(tmp_path / "cards.csv", 1000, "ABC")
    assert len(generated.valid) + len(generated.invalid_lines) == 1000
    assert len(set(generated.valid.values())) == len(generated.valid)


async def test_a_chunk_waits_for_a_writer_giving_one_of_its_persons_a_card(
    context: ServiceContext, tmp_path: Path, admin_token: str
) -> None:
    """Chunks lock the registered persons they name: a writer in the middle of giving one of them a card
    (a single issue, another import) holds the row, the chunk waits for its commit and then sees the card.
    Chunks no longer take turns on their region, so without the person's lock both would give a card."""
    if context.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: the chunk cannot write beside the other writer at all")
    prefix = card_prefix()
    person = factories.citizen_id(SICHUAN)
    card = await registered_without_a_card_in_use(context, tmp_path, person, f"{prefix}000001")
    # Another writer, half-way through issuing the person a card: the person's row locked, its card added.
    other = context.sessions()
    held = await other.scalar(select(Person).where(Person.id == card.person_id).with_for_update())
    assert held is not None
    other.add(Card(person_id=held.id, region_code=SICHUAN, card_number=f"{prefix}000002", state="issued",
                   created_at=card.created_at))  # fmt: skip
    await other.flush()
    importing = asyncio.ensure_future(
        run(context, tmp_path, csv_text([line(SICHUAN, person, "张三", f"{prefix}000003")]))
    )
    await asyncio.sleep(1.0)
    assert not importing.done(), "the chunk did not wait for the person's lock"
    await other.commit()
    await other.close()
    result = await asyncio.wait_for(importing, 30)
    assert (result.progress.created, result.progress.rejected) == (0, 1)
    assert [row["reason"] for row in await report(context, result.job_id)] == [
        "this person already holds a card in use"
    ]
    async with context.sessions() as session:
        in_use = await session.scalar(
            select(func.count())
            .select_from(Card)
            .where(Card.person_id == held.id, Card.state.in_(["issued", "active"]))
        )
    assert in_use == 1


async def test_a_chunk_deadlocked_with_another_writer_is_written_again(
    context: ServiceContext, tmp_path: Path, admin_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writers each waiting for a row the other holds: PostgreSQL aborts one. When it is the chunk,
    the chunk is classified and written again, as after a unique-index conflict; nothing is lost."""
    if context.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: no two writers wait for each other")
    prefix = card_prefix()
    registered, new = factories.citizen_id(SICHUAN), factories.citizen_id(SICHUAN)
    card = await registered_without_a_card_in_use(context, tmp_path, registered, f"{prefix}000001")
    # The other writer registers the new person, uncommitted: the chunk will wait for that row.
    other = context.sessions()
    other.add(Person(region_code=SICHUAN, citizen_id_index=context.pii.blind_index(new, CITIZEN_ID_FIELD),
                     citizen_id_encrypted=context.pii.encrypt(new, CITIZEN_ID_FIELD),
                     name_encrypted=context.pii.encrypt("李四", NAME_FIELD), created_at=card.created_at))  # fmt: skip
    await other.flush()
    rows = [line(SICHUAN, registered, "张三", f"{prefix}000002"), line(SICHUAN, new, "李四", f"{prefix}000003")]
    importing = asyncio.ensure_future(run(context, tmp_path, csv_text(rows)))
    await asyncio.sleep(0.5)  # the chunk holds the registered person's lock and waits for the new person
    assert not importing.done()
    # Now the other writer wants the registered person: each waits for the other, the chunk first, so
    # PostgreSQL's deadlock check (after deadlock_timeout) aborts the chunk.
    await other.scalar(select(Person).where(Person.id == card.person_id).with_for_update())
    await other.commit()
    await other.close()
    result = await asyncio.wait_for(importing, 30)
    assert (result.progress.created, result.progress.rejected) == (2, 0)
    assert await count_cards(context, prefix) == (3, 3, 2)  # the revoked card, and one new card each
    assert "a concurrent writer took a row of this chunk; retrying" in caplog.text

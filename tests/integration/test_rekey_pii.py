"""Moving a live deployment's personal data between crypto profiles (`ecard keys rekey-pii`).

On a fresh database of each backend: 25 cards issued under the international profile, then the
re-keying to the national one in batches of 7, stopped after two batches and resumed from the cursor,
with look-ups by citizen ID from both profiles after every batch and from a task that looks up
all the while; then a check, the old pair dropped, and the whole way back. Counts are exact. Also: an
import, a concurrent change, a duplicate person, the command, and two workers of both profiles
through the API on the shared database.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.asgi import create_app
from app.db.clock import utcnow
from app.db.engine import create_engine, create_session_factory
from app.db.models import ECard, IssuerKey, Person
from app.domain.audit.services import Actor
from app.domain.cards.citizen_id import mask_citizen_id, mask_name
from app.domain.cards.rekey import RekeyReport, rekey_pii
from app.domain.cards.services import CITIZEN_ID_FIELD, NAME_FIELD, citizen_id_match, find_cards, issue_card
from app.domain.errors import Conflict
from app.domain.imports.services import import_file
from app.domain.issuers.services import load_issuer_keys
from app.domain.regions.services import register_region
from app.domain.verification.disclosure import profile_field
from app.security.keyring import read_keyring
from app.security.pii import INTERNATIONAL, NATIONAL, SM4_GCM_TAG, PiiCipher
from app.server.context import ServiceContext
from app.settings import DEV_KEYS_DIR
from crypto.sm import hmac_sm3
from tests import factories
from tests.conftest import BACKENDS, _drop_postgres_database, make_settings, migrated_database, serve
from tests.factories import bearer

REGION = "510000"
CARDS = 25
BATCH = 7
KEYRING = read_keyring(DEV_KEYS_DIR)
INTL = KEYRING.pii(INTERNATIONAL)  # both pairs: the dual-index period, seen from either side
NAT = KEYRING.pii(NATIONAL)
INTL_ONLY = PiiCipher(KEYRING.data_key, KEYRING.index_key)
NAT_ONLY = PiiCipher(None, None, sm4_key=KEYRING.sm4_key, sm3_index_key=KEYRING.sm3_index_key, profile=NATIONAL)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=BACKENDS)
async def database(request: pytest.FixtureRequest, tmp_path: Path, postgres_url: URL) -> AsyncIterator[str]:
    """A fresh migrated database of the backend for this test alone (the counts are exact)."""
    url = await migrated_database(request.param, tmp_path, postgres_url)
    yield url.render_as_string(hide_password=False)
    if request.param == "postgres":
        await _drop_postgres_database(postgres_url, url.database or "")


@pytest.fixture
async def sessions(database: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database)
    yield create_session_factory(engine)
    await engine.dispose()


async def _issue(sessions: async_sessionmaker[AsyncSession], pii: PiiCipher, count: int) -> dict[str, str]:
    """count cards of new persons; their names by citizen ID."""
    people: dict[str, str] = {}
    for n in range(count):
        citizen_id, name = factories.citizen_id(REGION), f"测试{n:03d}"
        async with sessions() as session:
            await issue_card(
                session, pii, region=REGION, citizen_id=citizen_id, name=name,
                card_number=factories.card_number(), code_ttl=600,
            )  # fmt: skip
        people[citizen_id] = name
    return people


async def _look_up_all(sessions: async_sessionmaker[AsyncSession], pii: PiiCipher, people: dict[str, str]) -> int:
    """Look every person up by citizen ID; assert each is found once, with its name; the number found."""
    found = 0
    async with sessions() as session:
        for citizen_id, name in people.items():
            rows = await find_cards(session, pii, ("*",), card_number=None, citizen_id=citizen_id)
            assert len(rows) == 1, (citizen_id, len(rows))
            assert pii.decrypt(rows[0][2].name_encrypted, NAME_FIELD) == name
            found += 1
    return found


async def _schemes(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """How many stored blobs of each table carry the SM4 tag and open with SM4 (the rest are AES)."""
    async with sessions() as session:
        persons = (await session.execute(select(Person))).scalars().all()
        ecards = (await session.execute(select(ECard).where(ECard.sealed_profile.is_not(None)))).scalars().all()
        keys = (await session.execute(select(IssuerKey))).scalars().all()
    counts = {"persons": 0, "ecards": 0, "issuer_keys": 0}
    for person in persons:
        schemes = {
            NAT.open(person.citizen_id_encrypted, CITIZEN_ID_FIELD)[1],
            NAT.open(person.name_encrypted, NAME_FIELD)[1],
        }
        assert len(schemes) == 1, "a person's blobs are rewritten together"
        citizen_id = NAT.decrypt(person.citizen_id_encrypted, CITIZEN_ID_FIELD)
        expected = NAT.blind_index_as(citizen_id, CITIZEN_ID_FIELD, schemes.pop())
        assert person.citizen_id_index == expected, "the index goes with the blobs"
        counts["persons"] += person.citizen_id_encrypted[0] == SM4_GCM_TAG and expected == hmac_sm3(
            KEYRING.sm3_index_key or b"", CITIZEN_ID_FIELD.encode() + b"\x00" + citizen_id.encode()
        )
    for ecard in ecards:
        counts["ecards"] += NAT.open(ecard.sealed_profile or b"", profile_field(ecard.card_ref))[1] == NATIONAL
    for key in keys:
        counts["issuer_keys"] += NAT.open(key.private_key_encrypted, "issuer_keys.private_key")[1] == NATIONAL
    return counts


async def test_rekey_to_national_and_back_never_misses_a_look_up(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        await register_region(session, INTL_ONLY, Actor.command("test"), REGION, "四川省")
    people = await _issue(sessions, INTL_ONLY, CARDS)
    assert await _schemes(sessions) == {"persons": 0, "ecards": 0, "issuer_keys": 0}
    async with sessions() as session:
        public_keys = {kid: key.public for kid, key in (await load_issuer_keys(session, INTL_ONLY)).verify_keys.items()}

    # While the re-keying runs, a task keeps looking everyone up, from the international side.
    stop = asyncio.Event()
    lookups = 0

    async def keep_looking() -> None:
        nonlocal lookups
        while not stop.is_set():
            lookups += await _look_up_all(sessions, INTL, people)
            await asyncio.sleep(0)

    async def after_batch(report: RekeyReport) -> None:
        # Between batches, from both sides of the dual-index period.
        assert await _look_up_all(sessions, NAT, people) == CARDS
        assert await _look_up_all(sessions, INTL, people) == CARDS

    looker = asyncio.create_task(keep_looking())
    first = await rekey_pii(sessions, NAT, batch=BATCH, max_batches=2, on_batch=after_batch)
    assert not first.complete
    assert (first.persons.scanned, first.persons.rewritten, first.persons.current) == (2 * BATCH, 2 * BATCH, 0)
    assert (first.issuer_keys.scanned, first.issuer_keys.rewritten) == (1, 1)
    assert first.ecards.scanned == 0
    assert await _schemes(sessions) == {"persons": 2 * BATCH, "ecards": 0, "issuer_keys": 1}
    # A person already in the database, registered again by a national worker: found, not duplicated.
    some_citizen = next(iter(people))
    async with sessions() as session:
        with pytest.raises(Conflict, match="already holds a card in use"):
            await issue_card(
                session, NAT, region=REGION, citizen_id=some_citizen, name="x",
                card_number=factories.card_number(), code_ttl=600,
            )  # fmt: skip

    rest = await rekey_pii(sessions, NAT, batch=BATCH, after=first.last_person, on_batch=after_batch)
    stop.set()
    await looker
    assert rest.complete and lookups >= CARDS
    assert (rest.persons.scanned, rest.persons.rewritten, rest.persons.current) == (CARDS - 2 * BATCH,) * 2 + (0,)
    assert (rest.ecards.scanned, rest.ecards.rewritten) == (CARDS, CARDS)
    assert (rest.issuer_keys.scanned, rest.issuer_keys.rewritten, rest.issuer_keys.current) == (1, 0, 1)
    assert rest.remaining == 0
    assert await _schemes(sessions) == {"persons": CARDS, "ecards": CARDS, "issuer_keys": 1}

    check = await rekey_pii(sessions, NAT, write=False)
    assert (check.persons.scanned, check.persons.current, check.remaining) == (CARDS, CARDS, 0)
    assert (check.ecards.current, check.issuer_keys.current) == (CARDS, 1)

    # The old pair dropped: the national keys alone find everyone and open the issuer keys.
    assert await _look_up_all(sessions, NAT_ONLY, people) == CARDS
    async with sessions() as session:
        keys = await load_issuer_keys(session, NAT_ONLY)
        assert {kid: key.public for kid, key in keys.verify_keys.items()} == public_keys
        assert len(keys.signing_keys) == 1
        count = await session.scalar(select(func.count()).select_from(Person))
    assert count == CARDS

    # And back: a check counts what the international profile would rewrite, then it is rewritten.
    back_check = await rekey_pii(sessions, INTL, write=False)
    assert back_check.remaining == CARDS + CARDS + 1 and back_check.persons.rewritten == 0
    assert await _schemes(sessions) == {"persons": CARDS, "ecards": CARDS, "issuer_keys": 1}
    back = await rekey_pii(sessions, INTL, batch=BATCH, on_batch=after_batch)
    assert (back.persons.rewritten, back.ecards.rewritten, back.issuer_keys.rewritten, back.remaining) == (
        CARDS, CARDS, 1, 0,
    )  # fmt: skip
    assert await _schemes(sessions) == {"persons": 0, "ecards": 0, "issuer_keys": 0}
    assert await _look_up_all(sessions, INTL_ONLY, people) == CARDS
    async with sessions() as session:
        person = (await session.execute(select(Person).limit(1))).scalar_one()
    # Untagged AES-GCM again, and the HMAC-SHA256 index of old.
    citizen_id = INTL_ONLY.decrypt(person.citizen_id_encrypted, CITIZEN_ID_FIELD)
    message = CITIZEN_ID_FIELD.encode() + b"\x00" + citizen_id.encode()
    assert person.citizen_id_index == hmac.new(KEYRING.index_key or b"", message, hashlib.sha256).digest()
    assert len(person.citizen_id_encrypted) == 12 + 18 + 16


async def test_an_import_in_the_dual_index_period_finds_persons_of_the_old_index(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    async with sessions() as session:
        await register_region(session, INTL_ONLY, Actor.command("test"), REGION, "四川省")
    people = await _issue(sessions, INTL_ONLY, 3)
    known = list(people)
    fresh = factories.citizen_id(REGION)
    upload = tmp_path / "cards.csv"
    lines = ["region,citizen_id,name,card_number"]
    lines += [f"{REGION},{citizen_id},{people[citizen_id]},{factories.card_number()}" for citizen_id in known]
    lines.append(f"{REGION},{fresh},新人,{factories.card_number()}")
    upload.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = await import_file(sessions, NAT, upload, Actor.command("test"), regions=["*"])

    # The three are found by their HMAC-SHA256 index (they hold a card in use): no duplicate persons.
    assert (result.progress.created, result.progress.rejected) == (1, 3)
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Person)) == 4
    # The import moved their index (and citizen ID blob) to the national one; the name waits for rekey-pii.
    people[fresh] = "新人"
    assert await _look_up_all(sessions, NAT, people) == 4
    async with sessions() as session:
        moved = await session.scalar(
            select(func.count()).select_from(Person).where(citizen_id_match(NAT_ONLY, known[0]))
        )
    assert moved == 1
    report = await rekey_pii(sessions, NAT)
    assert (report.persons.scanned, report.persons.rewritten, report.persons.current) == (4, 3, 1)
    # The imported eCard's profile was sealed by the import, under the national profile already.
    assert (report.ecards.scanned, report.ecards.rewritten) == (4, 3)
    assert await _schemes(sessions) == {"persons": 4, "ecards": 4, "issuer_keys": 1}
    assert await _look_up_all(sessions, NAT_ONLY, people) == 4


async def test_the_command_counts_and_exits_1_while_rows_remain(database: str, tmp_path: Path) -> None:
    engine = create_engine(database)
    sessions = create_session_factory(engine)
    async with sessions() as session:
        await register_region(session, INTL_ONLY, Actor.command("test"), REGION, "四川省")
    await _issue(sessions, INTL_ONLY, 3)
    await engine.dispose()
    env = {**os.environ, "DATABASE_URL": database, "ECARD_KEYS_DIR": str(DEV_KEYS_DIR), "REDIS_URL": ""}

    async def run(*args: str, profile: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "litestar"), "--app", "app.asgi:create_app", "ecard", "keys",
            "rekey-pii", *args, cwd=PROJECT_ROOT, env={**env, "ECARD_CRYPTO_PROFILE": profile},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, output.decode()

    code, output = await run("--check", profile=NATIONAL)
    assert code == 1, output
    assert "persons: scanned 3, rewritten 0, already national 0" in output
    assert "remaining 7 rows not in the national scheme" in output
    code, output = await run("--batch", "2", profile=NATIONAL)
    assert code == 0, output
    assert "persons: scanned 3, rewritten 3, already national 0, changed meanwhile 0" in output
    assert "issuer_keys: scanned 1, rewritten 1" in output
    assert "remaining 0 rows not in the national scheme" in output
    code, output = await run("--check", profile=NATIONAL)
    assert code == 0 and "persons: scanned 3, rewritten 0, already national 3" in output, output


async def test_a_row_changed_between_read_and_write_is_left_for_the_next_run(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        await register_region(session, INTL_ONLY, Actor.command("test"), REGION, "四川省")
    people = await _issue(sessions, INTL_ONLY, 5)
    victim = next(iter(people))

    async def concurrent_writer() -> None:
        # What an import in the dual-index period does to a person it finds by the old index.
        async with sessions() as session:
            person = (await session.execute(select(Person).where(citizen_id_match(INTL_ONLY, victim)))).scalar_one()
            person.citizen_id_encrypted = INTL_ONLY.encrypt(victim, CITIZEN_ID_FIELD)
            await session.commit()

    first = await rekey_pii(sessions, NAT, before_write=concurrent_writer)
    assert (first.persons.scanned, first.persons.rewritten, first.persons.changed) == (5, 4, 1)
    assert first.persons.remaining == 1 and first.remaining == 1
    assert await _look_up_all(sessions, NAT, people) == 5
    second = await rekey_pii(sessions, NAT)
    assert (second.persons.rewritten, second.persons.current, second.remaining) == (1, 4, 0)
    assert await _look_up_all(sessions, NAT_ONLY, people) == 5


async def test_a_duplicate_person_of_the_other_scheme_is_reported_not_merged(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Two workers of a rolling restart, one per profile, registering the same citizen at once."""
    async with sessions() as session:
        await register_region(session, INTL_ONLY, Actor.command("test"), REGION, "四川省")
        citizen_id = factories.citizen_id(REGION)
        for pii in (INTL_ONLY, NAT_ONLY):
            session.add(
                Person(
                    region_code=REGION, citizen_id_index=pii.blind_index(citizen_id, CITIZEN_ID_FIELD),
                    citizen_id_encrypted=pii.encrypt(citizen_id, CITIZEN_ID_FIELD),
                    name_encrypted=pii.encrypt("重复", NAME_FIELD), created_at=utcnow(),
                )
            )  # fmt: skip
        await session.commit()
    report = await rekey_pii(sessions, NAT)
    assert (report.persons.scanned, report.persons.current, report.persons.duplicates) == (2, 1, 1)
    assert (report.persons.rewritten, report.remaining) == (0, 1)
    async with sessions() as session:
        found = await session.scalar(select(func.count()).select_from(Person).where(citizen_id_match(NAT, citizen_id)))
    assert found == 2  # both still found in the dual-index period, for an operator to merge


async def test_workers_of_both_profiles_find_and_read_each_others_cards_through_the_api(
    client: httpx.AsyncClient,
    context: ServiceContext,
    admin_token: str,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A rolling restart's two kinds of worker, on the shared database, through the operator API."""
    national = create_app(make_settings(database_url, redis_url, redis_prefix, crypto_profile=NATIONAL))
    async with serve(national) as national_client:
        issued: dict[str, tuple[str, str]] = {}
        for side, worker in (("international", client), ("national", national_client)):
            citizen_id = factories.citizen_id(REGION)
            response = await worker.post(
                "/v1/operator/cards",
                json={
                    "region": REGION,
                    "citizen_id": citizen_id,
                    "name": "欧阳娜娜",
                    "card_number": factories.card_number(),
                },
                headers=bearer(admin_token),
            )
            assert response.status_code == 201, response.text
            issued[side] = (citizen_id, response.json()["card"]["card_id"])
        for side, (citizen_id, card_id) in issued.items():
            for worker in (client, national_client):
                found = await worker.post(
                    "/v1/operator/cards/search", json={"citizen_id": citizen_id}, headers=bearer(admin_token)
                )
                assert found.status_code == 200, found.text
                [card] = found.json()
                assert (card["card_id"], card["holder_name"]) == (card_id, mask_name("欧阳娜娜")), side
                assert card["citizen_id"] == mask_citizen_id(citizen_id)
    async with context.sessions() as session:
        for side, (citizen_id, _) in issued.items():
            person = (await session.execute(select(Person).where(citizen_id_match(NAT, citizen_id)))).scalar_one()
            assert (person.citizen_id_encrypted[0] == SM4_GCM_TAG) == (side == "national")
            assert len(person.name_encrypted) == (side == "national") + 12 + len("欧阳娜娜".encode()) + 16

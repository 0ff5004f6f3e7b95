"""Issuing cards to persons, activation codes, and the eCard's status."""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import NamedTuple, cast

from sqlalchemy import ColumnElement, Select, Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import ActivationCode, Card, CardState, ECard, ECardState, Entitlement, Person, Region
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.cards.citizen_id import InvalidCitizenId, mask_citizen_id, normalise_citizen_id
from app.domain.regions.scope import covers, within
from app.domain.verification.disclosure import (
    PARK_ANNUAL_PASS,
    Profile,
    entitlements_record,
    seal_profile,
)
from app.security.pii import PiiCipher
from app.security.tokens import OperatorSession
from app.stores.status_mirror import CardRecord, MirroredStatus, MirrorEntry, StatusMirror

CARD_NUMBER = re.compile(r"^[A-Z0-9]{9}$")
CITIZEN_ID_FIELD = "persons.citizen_id"
NAME_FIELD = "persons.name"
ACTIVATION_CODE_FIELD = "activation_codes.code"

MIRRORED = {
    ECardState.PENDING_ACTIVATION: MirroredStatus.PENDING_ACTIVATION,
    ECardState.ACTIVE: MirroredStatus.ACTIVE,
    ECardState.SUSPENDED: MirroredStatus.SUSPENDED,
    ECardState.REVOKED: MirroredStatus.REVOKED,
}


@dataclass(frozen=True, slots=True)
class IssuedCard:
    """A card just issued, with the activation code to hand to its holder."""

    card: Card
    ecard: ECard
    activation_code: str
    activation_expires_at: datetime


class InvalidCardNumber(ValueError):
    """The card number is malformed; the message says why (without echoing it)."""


def parse_card_number(raw: str) -> str:
    """Nine upper-case letters or digits; raise InvalidCardNumber otherwise (no HTTP, for bulk imports)."""
    number = raw.strip().upper()
    if not CARD_NUMBER.fullmatch(number):
        raise InvalidCardNumber("card number must be 9 letters or digits")
    return number


def normalise_card_number(raw: str) -> str:
    """Nine upper-case letters or digits; a 400 problem otherwise."""
    try:
        return parse_card_number(raw)
    except InvalidCardNumber as exc:
        raise errors.Invalid(str(exc)) from None


def activation_code_hash(pii: PiiCipher, ecard_id: uuid.UUID, code: str) -> str:
    """Keyed hash of a code: a database leak alone does not let anyone test guesses offline."""
    return pii.blind_index(f"{ecard_id.hex}:{code}", ACTIVATION_CODE_FIELD).hex()


def activation_code_hashes(pii: PiiCipher, ecard_id: uuid.UUID, code: str) -> tuple[str, ...]:
    """Every hash a stored code may carry: in a profile switch's dual-index period, either profile's."""
    return tuple(index.hex() for index in pii.blind_indexes(f"{ecard_id.hex}:{code}", ACTIVATION_CODE_FIELD))


def citizen_id_match(pii: PiiCipher, citizen_id: str) -> ColumnElement[bool]:
    """The condition on persons that finds the citizen ID whichever profile's index its row carries."""
    indexes = pii.blind_indexes(citizen_id, CITIZEN_ID_FIELD)
    if len(indexes) == 1:
        return Person.citizen_id_index == indexes[0]
    return Person.citizen_id_index.in_(indexes)


def _new_activation_code() -> str:
    digits = f"{secrets.randbelow(10**8):08d}"
    return f"{digits[:4]}-{digits[4:]}"


def normalise_activation_code(raw: str) -> str:
    """Accept the code with or without its dash or spaces."""
    digits = re.sub(r"[\s-]", "", raw)
    return f"{digits[:4]}-{digits[4:]}" if len(digits) == 8 and digits.isascii() and digits.isdigit() else ""


async def new_activation_code(session: AsyncSession, pii: PiiCipher, ecard: ECard, ttl: int) -> tuple[str, datetime]:
    """Replace any open code of the eCard with a fresh one (caller commits)."""
    now = utcnow()
    await session.execute(
        update(ActivationCode)
        .where(ActivationCode.ecard_id == ecard.id, ActivationCode.used_at.is_(None))
        .values(expires_at=now)
    )
    code = _new_activation_code()
    expires_at = now + timedelta(seconds=ttl)
    session.add(
        ActivationCode(
            ecard_id=ecard.id,
            code_hash=activation_code_hash(pii, ecard.id, code),
            expires_at=expires_at,
            attempts=0,
            created_at=now,
        )
    )
    return code, expires_at


async def issue_card(
    session: AsyncSession,
    pii: PiiCipher,
    *,
    region: str,
    citizen_id: str,
    name: str,
    card_number: str,
    code_ttl: int,
    actor: Actor | None = None,
    insurance_scheme: str = "urban_employee",
) -> IssuedCard:
    """Register (or find) the person, issue the physical card and its pending eCard, and an activation code."""
    try:
        citizen_id = normalise_citizen_id(citizen_id)
    except InvalidCitizenId as exc:
        raise errors.Invalid(str(exc)) from None
    card_number = normalise_card_number(card_number)
    name = name.strip()
    if not name:
        raise errors.Invalid("name must not be empty")
    if await session.get(Region, region) is None:
        raise errors.NotFound(f"region {region} is not registered")
    if await session.scalar(select(Card.id).where(Card.card_number == card_number)) is not None:
        raise errors.Conflict(f"card number {card_number} is already issued")
    index = pii.blind_index(citizen_id, CITIZEN_ID_FIELD)
    # A registered person's row locked until the commit, as an import's chunk locks the persons it names:
    # the two take turns, so neither gives them a second card in use the other's look-up could not see.
    person = await session.scalar(select(Person).where(citizen_id_match(pii, citizen_id)).with_for_update())
    now = utcnow()
    if person is None:
        person = Person(
            region_code=region,
            citizen_id_index=index,
            citizen_id_encrypted=pii.encrypt(citizen_id, CITIZEN_ID_FIELD),
            name_encrypted=pii.encrypt(name, NAME_FIELD),
            created_at=now,
            insurance_scheme=insurance_scheme,
        )
        session.add(person)
        await session.flush()
    elif await session.scalar(
        select(Card.id).where(Card.person_id == person.id, Card.state.in_([CardState.ISSUED, CardState.ACTIVE]))
    ):
        raise errors.Conflict("this person already holds a card in use")
    card = Card(
        person_id=person.id, region_code=region, card_number=card_number, state=CardState.ISSUED, created_at=now
    )
    session.add(card)
    await session.flush()
    card_ref = os.urandom(16)
    ecard = ECard(
        card_id=card.id,
        region_code=region,
        card_ref=card_ref,
        state=ECardState.PENDING_ACTIVATION,
        updated_at=now,
        # Sealed once here (the person's data never changes), so refilling the mirror seals nothing.
        sealed_profile=profile_record(pii, card_ref, person),
    )
    session.add(ecard)
    await session.flush()
    code, expires_at = await new_activation_code(session, pii, ecard, code_ttl)
    if actor is not None:
        record(
            session, actor, "card.issued", subject_type="card", subject_id=card.id, region=region,
            after={"card_state": card.state, "ecard_state": ecard.state},
        )  # fmt: skip
    await session.commit()
    return IssuedCard(card=card, ecard=ecard, activation_code=code, activation_expires_at=expires_at)


class ScopedCard(NamedTuple):
    """A card with its eCard and person, found within an operator's regions."""

    card: Card
    ecard: ECard
    person: Person


async def card_in_scope(session: AsyncSession, operator: OperatorSession, card_id: uuid.UUID) -> ScopedCard:
    """The card a path names (`card_id`), if it lies in the operator's regions; else 404, as for a missing one."""
    return ScopedCard(*await find_card(session, card_id, operator.regions))


async def find_card(session: AsyncSession, card_id: uuid.UUID, regions: tuple[str, ...]) -> tuple[Card, ECard, Person]:
    """A card with its eCard and person, if it lies in one of the regions ('*' = all); else 404."""
    row = (
        await session.execute(
            select(Card, ECard, Person)
            .join(ECard, ECard.card_id == Card.id)
            .join(Person, Person.id == Card.person_id)
            .where(Card.id == card_id)
        )
    ).first()
    if row is None or not covers(regions, row[0].region_code):
        # The same answer whether the card is missing or outside the operator's regions.
        raise errors.NotFound("no such card")
    return row[0], row[1], row[2]


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What a comparison of the database with the status mirror found (and repaired)."""

    checked: int
    missing: int
    different: int
    repaired: int
    # Cards whose disclosure profile (hospitals) was missing from the mirror.
    profiles_missing: int = 0


def profile_record(pii: PiiCipher, card_ref: bytes, person: Person) -> bytes:
    """The card's sealed disclosure profile: name, masked citizen ID, insured region."""
    citizen_id = pii.decrypt(person.citizen_id_encrypted, CITIZEN_ID_FIELD)
    name = pii.decrypt(person.name_encrypted, NAME_FIELD)
    return sealed_profile_of(pii, card_ref, name, citizen_id, person.region_code)


def sealed_profile_of(pii: PiiCipher, card_ref: bytes, name: str, citizen_id: str, region: str) -> bytes:
    """`profile_record` from the person's data in clear (a bulk import has it before it stores the person)."""
    return seal_profile(pii, card_ref, Profile(name, mask_citizen_id(citizen_id), region))


async def entitlements_of(session: AsyncSession, ecard_id: uuid.UUID) -> bytes | None:
    """The eCard's current entitlements as the mirror keeps them (None: none)."""
    rows = await session.execute(
        select(Entitlement.region_code, Entitlement.valid_until).where(
            Entitlement.ecard_id == ecard_id,
            Entitlement.kind == PARK_ANNUAL_PASS,
            Entitlement.revoked_at.is_(None),
            Entitlement.valid_until >= utcnow(),
        )
    )
    return entitlements_record([(region, until.date()) for region, until in rows])


# eCard state → mirrored status, by the stored value (rows of a Core select carry plain strings).
STATUS_OF_STATE = {state.value: status for state, status in MIRRORED.items()}


MirrorRow = tuple[uuid.UUID, bytes, str, int, bytes | None]

# The same page as `mirror_rows_query`, for asyncpg itself: its records cost a fraction of ORM rows per card.
_MIRROR_ROWS_SQL = "SELECT id, card_ref, state, mirror_version, sealed_profile FROM ecards {where} ORDER BY id LIMIT $1"


def mirror_rows_query(after: uuid.UUID | None, limit: int) -> Select[uuid.UUID, bytes, str, int, bytes | None]:
    """A page of eCards in id order after `after` (keyset: no OFFSET), as tuples: what the mirror needs of each."""
    query = (
        select(ECard.id, ECard.card_ref, ECard.state, ECard.mirror_version, ECard.sealed_profile)
        .order_by(ECard.id)
        .limit(limit)
    )
    return query if after is None else query.where(ECard.id > after)


async def mirror_rows(session: AsyncSession, after: uuid.UUID | None, limit: int) -> Sequence[MirrorRow]:
    """`mirror_rows_query`'s page; on PostgreSQL through asyncpg directly (the rebuild's hot loop)."""
    connection = await session.connection()
    if connection.dialect.driver != "asyncpg":
        return cast("list[MirrorRow]", (await session.execute(mirror_rows_query(after, limit))).all())
    raw = (await connection.get_raw_connection()).driver_connection
    assert raw is not None
    if after is None:
        records = await raw.fetch(_MIRROR_ROWS_SQL.format(where=""), limit)
    else:
        records = await raw.fetch(_MIRROR_ROWS_SQL.format(where="WHERE id > $2"), limit, after)
    return cast("list[MirrorRow]", records)


async def entitlements_between(session: AsyncSession, first: uuid.UUID, last: uuid.UUID) -> dict[uuid.UUID, bytes]:
    """The current entitlements records of the eCards with ids in [first, last], in one query (absent: none)."""
    rows = await session.execute(
        select(Entitlement.ecard_id, Entitlement.region_code, Entitlement.valid_until).where(
            Entitlement.ecard_id >= first,
            Entitlement.ecard_id <= last,
            Entitlement.kind == PARK_ANNUAL_PASS,
            Entitlement.revoked_at.is_(None),
            Entitlement.valid_until >= utcnow(),
        )
    )
    passes: dict[uuid.UUID, list[tuple[str, date]]] = {}
    for ecard_id, region, until in rows:
        passes.setdefault(ecard_id, []).append((region, until.date()))
    return {ecard_id: record for ecard_id, found in passes.items() if (record := entitlements_record(found))}


async def seal_missing_profiles(
    session: AsyncSession, pii: PiiCipher, ecard_ids: list[uuid.UUID]
) -> dict[uuid.UUID, bytes]:
    """Seal the profiles of these eCards and keep them in their rows (eCards made before 0009, or by bulk
    import); the caller commits. Only where none is kept yet: a concurrent writer's profile stays."""
    rows = await session.execute(
        select(ECard.id, ECard.card_ref, Person)
        .join(Card, Card.id == ECard.card_id)
        .join(Person, Person.id == Card.person_id)
        .where(ECard.id.in_(ecard_ids))
    )
    sealed = {ecard_id: profile_record(pii, card_ref, person) for ecard_id, card_ref, person in rows}
    if sealed:
        table = ECard.__table__
        assert isinstance(table, Table)
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("ecard_id"), table.c.sealed_profile.is_(None))
            .values(sealed_profile=bindparam("profile")),
            [{"ecard_id": ecard_id, "profile": profile} for ecard_id, profile in sealed.items()],
        )
    return sealed


async def mirror_entries(
    session: AsyncSession, pii: PiiCipher, rows: Sequence[MirrorRow]
) -> tuple[list[MirrorEntry], int]:
    """What `mirror_many` writes for rows of `mirror_rows_query` (sorted by id), and how many profiles had to be
    sealed (the caller commits them): entitlements in one query, profiles from the rows."""
    if not rows:
        return [], 0
    passes = await entitlements_between(session, rows[0][0], rows[-1][0])
    unsealed = [row[0] for row in rows if row[4] is None]
    sealed = await seal_missing_profiles(session, pii, unsealed) if unsealed else {}
    entries = [
        MirrorEntry(
            card_ref,
            version,
            STATUS_OF_STATE[state],
            stored if stored is not None else sealed.get(ecard_id),
            passes.get(ecard_id),
        )
        for ecard_id, card_ref, state, version, stored in rows
    ]
    return entries, len(sealed)


async def reconcile_status_mirror(
    session: AsyncSession,
    mirror: StatusMirror,
    pii: PiiCipher,
    *,
    repair: bool,
    batch: int = 1000,
    on_page: Callable[[int], None] | None = None,
) -> Reconciliation:
    """Compare every eCard's state and profile with the mirror, page by page; with repair, fix drift.

    The database is the truth: a missing or different mirror entry is set from it (with the
    card's entitlements), under the eCard's mirror version, so a repair running beside the service
    never replaces a newer change. Drift comes from a Redis restart (it keeps nothing on disk).
    Pages follow the id (keyset); a page costs two store round trips and, with drift, one bulk write.
    `on_page` is told the eCards checked so far (progress).
    """
    checked = missing = different = repaired = profiles_missing = 0
    after: uuid.UUID | None = None
    while rows := await mirror_rows(session, after, batch):
        after = rows[-1][0]
        refs = [row[1] for row in rows]
        actual = await mirror.get_statuses(refs)
        no_profile = await mirror.missing_records(refs, CardRecord.PROFILE)
        drifted = []
        for row, seen, absent in zip(rows, actual, no_profile, strict=True):
            checked += 1
            profiles_missing += absent
            status = STATUS_OF_STATE[row[2]].value
            if seen == status and not absent:
                continue
            if seen is None:
                missing += 1
            elif seen != status:
                different += 1
            drifted.append(row)
        if repair and drifted:
            # Records and status in one write per card: a card is never active in the mirror without its profile.
            entries, sealed = await mirror_entries(session, pii, drifted)
            if sealed:
                await session.commit()
            await mirror.mirror_many(entries)
            repaired += len(entries)
        if on_page is not None:
            on_page(checked)
    return Reconciliation(checked, missing, different, repaired, profiles_missing)


async def mirror_all_statuses(session: AsyncSession, mirror: StatusMirror, pii: PiiCipher) -> int:
    """Fill an empty mirror from the database (the in-process store at start-up); the number set."""
    return (await reconcile_status_mirror(session, mirror, pii, repair=True)).repaired


async def find_cards(
    session: AsyncSession,
    pii: PiiCipher,
    regions: tuple[str, ...],
    *,
    card_number: str | None,
    citizen_id: str | None,
) -> list[tuple[Card, ECard, Person]]:
    """Cards (with eCard and person) by card number or citizen ID, within regions; newest first."""
    if not card_number and not citizen_id:
        raise errors.Invalid("give card_number or citizen_id")
    query = (
        select(Card, ECard, Person)
        .join(Person, Person.id == Card.person_id)
        .outerjoin(ECard, ECard.card_id == Card.id)
        .order_by(Card.created_at.desc())
        .limit(50)
    )
    if card_number:
        query = query.where(Card.card_number == card_number.strip().upper())
    if citizen_id:
        query = query.where(citizen_id_match(pii, citizen_id))
    query = within(query, Card.region_code, regions)
    return [(card, ecard, person) for card, ecard, person in await session.execute(query) if ecard is not None]

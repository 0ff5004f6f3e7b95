"""Re-keying personal data at rest to the deployment's crypto profile (`ecard keys rekey-pii`).

A switch between the international profile (AES-256-GCM, HMAC-SHA256) and the national one
(SM4-GCM, HMAC-SM3) rewrites, in keyset batches of one transaction each:

- persons: the citizen ID and name blobs and the citizen ID's blind index, in one UPDATE per row, so
  a row's index and ciphertexts always change together;
- ecards: the sealed disclosure profile;
- issuer_keys: the private keys.

Every UPDATE is a compare-and-set on the values read (`WHERE id = … AND blob = old blob`), so a row a
request changed in the meantime is left as it is (`changed`) and taken by the next run; nothing is
locked beyond the batch's own writes. Rows already in the target scheme are skipped, so a run can
stop anywhere and a new one (from the start or from the printed `--after` cursor) completes the job.

While it runs, look-ups never miss: the service holds both index keys (the dual-index period) and
looks up both indexes (`PiiCipher.blind_indexes`). See docs/national-crypto.md for the whole drill.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from cryptography.exceptions import InvalidTag
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import ECard, IssuerKey, Person
from app.domain.cards.services import CITIZEN_ID_FIELD, NAME_FIELD
from app.domain.issuers.services import PRIVATE_KEY_FIELD
from app.domain.verification.disclosure import profile_field
from app.security.pii import PiiCipher

DEFAULT_BATCH = 1000


@dataclass(slots=True)
class TableCounts:
    """What a run did to one table."""

    scanned: int = 0
    # Rewritten to the target scheme.
    rewritten: int = 0
    # Already in the target scheme (nothing written).
    current: int = 0
    # Changed by someone else between the read and the compare-and-set: left for the next run.
    changed: int = 0
    # A blob no key of the keyring opens: left as it is, and the run reports failure.
    unreadable: int = 0
    # persons only: the target index is already another row's (a duplicate person): left as it is.
    duplicates: int = 0

    @property
    def remaining(self) -> int:
        """Rows still not in the target scheme after the run (or that a check found so)."""
        return self.scanned - self.current - self.rewritten


@dataclass(slots=True)
class RekeyReport:
    """Counts of a run (or a check: `rewritten` stays 0) per table, and the persons cursor."""

    target: str
    persons: TableCounts = field(default_factory=TableCounts)
    ecards: TableCounts = field(default_factory=TableCounts)
    issuer_keys: TableCounts = field(default_factory=TableCounts)
    # The last person id handled: `--after` resumes from it.
    last_person: uuid.UUID | None = None
    # False when the run stopped before the end (max_batches).
    complete: bool = True

    @property
    def remaining(self) -> int:
        """Rows of all three tables not in the target scheme."""
        return self.persons.remaining + self.ecards.remaining + self.issuer_keys.remaining


def _open(pii: PiiCipher, blob: bytes, field_name: str) -> tuple[bytes, str] | None:
    try:
        return pii.open(bytes(blob), field_name)
    except InvalidTag:
        return None


async def _persons_batch(
    session: AsyncSession,
    pii: PiiCipher,
    after: uuid.UUID | None,
    batch: int,
    counts: TableCounts,
    write: bool,
    before_write: Callable[[], Awaitable[None]] | None,
) -> uuid.UUID | None:
    query = select(Person.id, Person.citizen_id_index, Person.citizen_id_encrypted, Person.name_encrypted)
    if after is not None:
        query = query.where(Person.id > after)
    rows = (await session.execute(query.order_by(Person.id).limit(batch))).all()
    target = pii.profile
    planned: list[tuple[uuid.UUID, bytes, bytes, bytes, bytes, bytes, bytes]] = []
    for person_id, index, citizen_blob, name_blob in rows:
        counts.scanned += 1
        citizen = _open(pii, citizen_blob, CITIZEN_ID_FIELD)
        name = _open(pii, name_blob, NAME_FIELD)
        if citizen is None or name is None:
            counts.unreadable += 1
            continue
        new_index = pii.blind_index_as(citizen[0].decode(), CITIZEN_ID_FIELD, target)
        if citizen[1] == target and name[1] == target and bytes(index) == new_index:
            counts.current += 1
            continue
        if write:
            planned.append(
                (person_id, bytes(index), bytes(citizen_blob), bytes(name_blob), new_index, citizen[0], name[0])
            )
    if planned and before_write is not None:
        await before_write()
    if planned:
        taken = {
            bytes(taken_index)
            for taken_index in await session.scalars(
                select(Person.citizen_id_index).where(
                    Person.citizen_id_index.in_([row[4] for row in planned]),
                    Person.id.not_in([row[0] for row in planned]),
                )
            )
        }
        params: list[dict[str, object]] = []
        expected: dict[uuid.UUID, bytes] = {}
        for person_id, index, citizen_blob, name_blob, new_index, citizen_id, name_text in planned:
            if new_index in taken:  # another row (a duplicate person of a race) has it: leave both
                counts.duplicates += 1
                continue
            taken.add(new_index)
            expected[person_id] = pii.encrypt_bytes_as(citizen_id, CITIZEN_ID_FIELD, target)
            params.append(
                {
                    "b_id": person_id, "b_index": index, "b_citizen": citizen_blob, "b_name": name_blob,
                    "b_new_index": new_index, "b_new_citizen": expected[person_id],
                    "b_new_name": pii.encrypt_bytes_as(name_text, NAME_FIELD, target),
                }
            )  # fmt: skip
        if params:
            persons = cast(Table, Person.__table__)  # Core: one executemany for the batch
            await session.execute(
                update(persons)
                .where(
                    persons.c.id == bindparam("b_id"),
                    persons.c.citizen_id_index == bindparam("b_index"),
                    persons.c.citizen_id_encrypted == bindparam("b_citizen"),
                    persons.c.name_encrypted == bindparam("b_name"),
                )
                .values(
                    citizen_id_index=bindparam("b_new_index"),
                    citizen_id_encrypted=bindparam("b_new_citizen"),
                    name_encrypted=bindparam("b_new_name"),
                ),
                params,
            )
            # An executemany's rowcount is not reliable on every driver: count what this transaction
            # wrote (fresh nonces: a row holds the new blob only if this update took it).
            stored = await session.execute(
                select(Person.id, Person.citizen_id_encrypted).where(Person.id.in_(list(expected)))
            )
            rewritten = sum(1 for person_id, blob in stored if bytes(blob) == expected[person_id])
            counts.rewritten += rewritten
            counts.changed += len(params) - rewritten
    await session.commit()
    return rows[-1][0] if rows else None


async def _ecards_batch(
    session: AsyncSession, pii: PiiCipher, after: uuid.UUID | None, batch: int, counts: TableCounts, write: bool
) -> uuid.UUID | None:
    query = select(ECard.id, ECard.card_ref, ECard.sealed_profile).where(ECard.sealed_profile.is_not(None))
    if after is not None:
        query = query.where(ECard.id > after)
    rows = (await session.execute(query.order_by(ECard.id).limit(batch))).all()
    target = pii.profile
    expected: dict[uuid.UUID, bytes] = {}
    params: list[dict[str, object]] = []
    for ecard_id, card_ref, sealed_or_none in rows:
        sealed = bytes(sealed_or_none or b"")  # never None: the query's condition
        counts.scanned += 1
        field_name = profile_field(bytes(card_ref))
        opened = _open(pii, sealed, field_name)
        if opened is None:
            counts.unreadable += 1
        elif opened[1] == target:
            counts.current += 1
        elif write:
            expected[ecard_id] = pii.encrypt_bytes_as(opened[0], field_name, target)
            params.append({"b_id": ecard_id, "b_sealed": sealed, "b_new_sealed": expected[ecard_id]})
    if params:
        ecards = cast(Table, ECard.__table__)
        await session.execute(
            update(ecards)
            .where(ecards.c.id == bindparam("b_id"), ecards.c.sealed_profile == bindparam("b_sealed"))
            .values(sealed_profile=bindparam("b_new_sealed")),
            params,
        )
        stored = await session.execute(select(ECard.id, ECard.sealed_profile).where(ECard.id.in_(list(expected))))
        rewritten = sum(1 for ecard_id, blob in stored if bytes(blob or b"") == expected[ecard_id])
        counts.rewritten += rewritten
        counts.changed += len(params) - rewritten
    await session.commit()
    return rows[-1][0] if rows else None


async def _issuer_keys(session: AsyncSession, pii: PiiCipher, counts: TableCounts, write: bool) -> None:
    rows = (await session.execute(select(IssuerKey.kid, IssuerKey.private_key_encrypted).order_by(IssuerKey.kid))).all()
    target = pii.profile
    for kid, blob in rows:
        counts.scanned += 1
        opened = _open(pii, blob, PRIVATE_KEY_FIELD)
        if opened is None:
            counts.unreadable += 1
        elif opened[1] == target:
            counts.current += 1
        elif write:
            result = await session.execute(
                update(IssuerKey)
                .where(IssuerKey.kid == kid, IssuerKey.private_key_encrypted == bytes(blob))
                .values(private_key_encrypted=pii.encrypt_bytes_as(opened[0], PRIVATE_KEY_FIELD, target))
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                counts.rewritten += 1
            else:
                counts.changed += 1
    await session.commit()


async def rekey_pii(
    sessions: async_sessionmaker[AsyncSession],
    pii: PiiCipher,
    *,
    batch: int = DEFAULT_BATCH,
    after: uuid.UUID | None = None,
    write: bool = True,
    max_batches: int | None = None,
    on_batch: Callable[[RekeyReport], Awaitable[None]] | None = None,
    before_write: Callable[[], Awaitable[None]] | None = None,
) -> RekeyReport:
    """Move every person, sealed profile and issuer private key to pii's profile (`write=False`:
    only count). Persons start after `after`; `max_batches` stops early (the report says so).
    `on_batch` runs after each batch; `before_write` between a persons batch's read and its writes
    (where a concurrent writer would strike: the tests' hook)."""
    if batch < 1:
        raise ValueError("the batch size is at least 1")
    report = RekeyReport(target=pii.profile)
    batches = 0
    async with sessions() as session:
        await _issuer_keys(session, pii, report.issuer_keys, write)
    cursor = after
    while True:
        if max_batches is not None and batches >= max_batches:
            report.complete = False
            return report
        async with sessions() as session:
            last = await _persons_batch(session, pii, cursor, batch, report.persons, write, before_write)
        if last is None:
            break
        cursor = report.last_person = last
        batches += 1
        if on_batch is not None:
            await on_batch(report)
    ecard_cursor: uuid.UUID | None = None
    while True:
        async with sessions() as session:
            last = await _ecards_batch(session, pii, ecard_cursor, batch, report.ecards, write)
        if last is None:
            break
        ecard_cursor = last
        if on_batch is not None:
            await on_batch(report)
    return report

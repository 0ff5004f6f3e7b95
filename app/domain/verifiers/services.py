"""Registering verifier organisations and terminals; terminal API keys are shown once."""

from __future__ import annotations

import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import problems
from app.clock import utcnow
from app.db.models import Region, Terminal, VerifierOrganisation
from app.domain.audit.services import Actor, record
from app.domain.verification.directory import API_KEY_PREFIX, hash_api_key_secret
from app.domain.verification.disclosure import BusinessType
from app.scope import covers, within
from crypto.credential import Purpose


def new_api_key(terminal_id: uuid.UUID) -> tuple[str, bytes]:
    """A fresh key `ecv1.<terminal id>.<secret>` and the hash to store."""
    secret = secrets.token_urlsafe(32)
    return f"{API_KEY_PREFIX}.{terminal_id.hex}.{secret}", hash_api_key_secret(secret)


def check_purposes(labels: list[str]) -> list[str]:
    """Known purpose names, without repeats, at least one."""
    if not labels:
        raise problems.bad_request("a terminal needs at least one allowed purpose")
    known = {purpose.label for purpose in Purpose}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise problems.bad_request(f"unknown purposes {unknown}; known: {sorted(known)}")
    return sorted(set(labels))


async def register_organisation(
    session: AsyncSession, actor: Actor, *, name: str, business_type: BusinessType, region: str
) -> VerifierOrganisation:
    """Create a verifier organisation in a registered region (commits)."""
    if await session.get(Region, region) is None:
        raise problems.not_found(f"region {region} is not registered")
    organisation = VerifierOrganisation(
        name=name.strip(), business_type=business_type.value, region_code=region, created_at=utcnow()
    )
    session.add(organisation)
    await session.flush()
    record(
        session, actor, "verifier_organisation.registered", subject_type="verifier_organisation",
        subject_id=organisation.id, region=region,
        after={"name": organisation.name, "business_type": business_type.value},
    )  # fmt: skip
    await session.commit()
    return organisation


async def get_organisation(
    session: AsyncSession, organisation_id: uuid.UUID, regions: tuple[str, ...]
) -> VerifierOrganisation:
    """The organisation if it lies in regions ('*' = all); otherwise 404."""
    organisation = await session.get(VerifierOrganisation, organisation_id)
    if organisation is None or not covers(regions, organisation.region_code):
        raise problems.not_found("no such verifier organisation")
    return organisation


async def list_organisations(session: AsyncSession, regions: tuple[str, ...]) -> list[VerifierOrganisation]:
    """Organisations in the regions ('*' = all), by name."""
    query = select(VerifierOrganisation).order_by(VerifierOrganisation.name)
    query = within(query, VerifierOrganisation.region_code, regions)
    return list((await session.scalars(query)).all())


async def register_terminal(
    session: AsyncSession, actor: Actor, organisation: VerifierOrganisation, *, name: str, purposes: list[str]
) -> tuple[Terminal, str]:
    """Create a terminal and return it with its API key, which is not stored and not shown again."""
    terminal_id = uuid.uuid4()
    api_key, key_hash = new_api_key(terminal_id)
    terminal = Terminal(
        id=terminal_id,
        organisation_id=organisation.id,
        name=name.strip(),
        allowed_purposes=check_purposes(purposes),
        api_key_hash=key_hash,
        enabled=True,
        created_at=utcnow(),
    )
    session.add(terminal)
    record(
        session, actor, "terminal.registered", subject_type="terminal", subject_id=terminal_id,
        region=organisation.region_code, after={"name": terminal.name, "allowed_purposes": terminal.allowed_purposes},
    )  # fmt: skip
    await session.commit()
    return terminal, api_key


async def get_terminal(
    session: AsyncSession, terminal_id: uuid.UUID, regions: tuple[str, ...]
) -> tuple[Terminal, VerifierOrganisation]:
    """The terminal and its organisation if in regions; otherwise 404."""
    row = (
        await session.execute(
            select(Terminal, VerifierOrganisation)
            .join(VerifierOrganisation, VerifierOrganisation.id == Terminal.organisation_id)
            .where(Terminal.id == terminal_id)
        )
    ).first()
    if row is None or not covers(regions, row[1].region_code):
        raise problems.not_found("no such terminal")
    return row[0], row[1]

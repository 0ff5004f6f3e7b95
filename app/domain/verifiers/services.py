"""Registering verifier organisations and terminals; terminal API keys are shown once.

Every change stamps the row with the directory counter's next value in its own transaction, so
workers find it by change feed (app/domain/verification/directory.py).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta

import nacl.bindings
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import Region, Terminal, VerifierOrganisation
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.regions.scope import covers, within
from app.domain.verification.directory import API_KEY_PREFIX, hash_api_key_secret, next_directory_version
from app.domain.verification.disclosure import BusinessType
from crypto.algorithms import ED25519, algorithm_of_public, name_of
from crypto.algorithms import public_key as algorithm_public_key
from crypto.credential import Purpose
from crypto.keys import PublicKey


def new_api_key(terminal_id: uuid.UUID, national: bool = False) -> tuple[str, bytes]:
    """A fresh key `ecv1.<terminal id>.<secret>` and the hash to store (SM3 under the national profile)."""
    secret = secrets.token_urlsafe(32)
    return f"{API_KEY_PREFIX}.{terminal_id.hex}.{secret}", hash_api_key_secret(secret, national)


def check_purposes(labels: list[str]) -> list[str]:
    """Known purpose names, without repeats, at least one."""
    if not labels:
        raise errors.Invalid("a terminal needs at least one allowed purpose")
    known = {purpose.label for purpose in Purpose}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise errors.Invalid(f"unknown purposes {unknown}; known: {sorted(known)}")
    return sorted(set(labels))


async def register_organisation(
    session: AsyncSession, actor: Actor, *, name: str, business_type: BusinessType, region: str
) -> VerifierOrganisation:
    """Create a verifier organisation in a registered region (commits)."""
    if await session.get(Region, region) is None:
        raise errors.NotFound(f"region {region} is not registered")
    organisation = VerifierOrganisation(
        name=name.strip(), business_type=business_type.value, region_code=region, created_at=utcnow()
    )
    session.add(organisation)
    await session.flush()
    organisation.directory_version = await next_directory_version(session)
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
        raise errors.NotFound("no such verifier organisation")
    return organisation


async def list_organisations(session: AsyncSession, regions: tuple[str, ...]) -> list[VerifierOrganisation]:
    """Organisations in the regions ('*' = all), by name."""
    query = select(VerifierOrganisation).order_by(VerifierOrganisation.name)
    query = within(query, VerifierOrganisation.region_code, regions)
    return list((await session.scalars(query)).all())


async def register_terminal(
    session: AsyncSession,
    actor: Actor,
    organisation: VerifierOrganisation,
    *,
    name: str,
    purposes: list[str],
    rate: tuple[int, int] = (120, 30),
    national: bool = False,
) -> tuple[Terminal, str]:
    """Create a terminal and return it with its API key, which is not stored and not shown again
    (its hash is SM3 when `national`, SHA-256 otherwise)."""
    terminal_id = uuid.uuid4()
    api_key, key_hash = new_api_key(terminal_id, national)
    terminal = Terminal(
        id=terminal_id,
        organisation_id=organisation.id,
        name=name.strip(),
        allowed_purposes=check_purposes(purposes),
        api_key_hash=key_hash,
        enabled=True,
        created_at=utcnow(),
        rate_per_minute=rate[0],
        rate_burst=rate[1],
    )
    session.add(terminal)
    terminal.directory_version = await next_directory_version(session)
    record(
        session, actor, "terminal.registered", subject_type="terminal", subject_id=terminal_id,
        region=organisation.region_code,
        after={"name": terminal.name, "allowed_purposes": terminal.allowed_purposes, "rate": list(rate)},
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
        raise errors.NotFound("no such terminal")
    return row[0], row[1]


async def set_organisation_enabled(
    session: AsyncSession, actor: Actor, organisation: VerifierOrganisation, enabled: bool
) -> None:
    """Enable or disable an organisation (commits); the caller tells the workers."""
    record(
        session, actor, "verifier_organisation.enabled" if enabled else "verifier_organisation.disabled",
        subject_type="verifier_organisation", subject_id=organisation.id, region=organisation.region_code,
        before={"enabled": organisation.enabled}, after={"enabled": enabled},
    )  # fmt: skip
    organisation.enabled = enabled
    organisation.directory_version = await next_directory_version(session)
    await session.commit()


async def update_terminal(
    session: AsyncSession,
    actor: Actor,
    terminal: Terminal,
    organisation: VerifierOrganisation,
    *,
    enabled: bool | None,
    purposes: list[str] | None,
    rate_per_minute: int | None,
    rate_burst: int | None,
) -> None:
    """Change what was given (commits); the audit event records before and after."""
    changes: dict[str, object] = {}
    if enabled is not None:
        changes["enabled"] = enabled
    if purposes is not None:
        changes["allowed_purposes"] = check_purposes(purposes)
    if rate_per_minute is not None:
        changes["rate_per_minute"] = rate_per_minute
    if rate_burst is not None:
        changes["rate_burst"] = rate_burst
    if not changes:
        raise errors.Invalid("nothing to change: give enabled, allowed_purposes, rate_per_minute or rate_burst")
    if set(changes) == {"enabled"}:
        action = "terminal.enabled" if enabled else "terminal.disabled"
    else:
        action = "terminal.updated"
    record(
        session, actor, action, subject_type="terminal", subject_id=terminal.id, region=organisation.region_code,
        before={name: getattr(terminal, name) for name in changes}, after=changes,
    )  # fmt: skip
    for name, value in changes.items():
        setattr(terminal, name, value)
    terminal.directory_version = await next_directory_version(session)
    await session.commit()


# A rotated-out key works at most this long (a week): long enough to reach every gate of a line.
MAX_KEY_OVERLAP = 7 * 24 * 3600


async def rotate_api_key(
    session: AsyncSession,
    actor: Actor,
    terminal: Terminal,
    organisation: VerifierOrganisation,
    overlap_seconds: int,
    national: bool = False,
) -> str:
    """A new API key (returned, not stored; hashed with SM3 when `national`); the old one works
    overlap_seconds more. Commits."""
    api_key, key_hash = new_api_key(terminal.id, national)
    now = utcnow()
    if overlap_seconds and terminal.signing_public_key is None:
        terminal.previous_key_hash = terminal.api_key_hash
        terminal.previous_key_expires_at = now + timedelta(seconds=overlap_seconds)
    else:
        terminal.previous_key_hash = None
        terminal.previous_key_expires_at = None
    terminal.api_key_hash = key_hash
    terminal.signing_public_key = None
    terminal.directory_version = await next_directory_version(session)
    record(
        session, actor, "terminal.api_key_rotated", subject_type="terminal", subject_id=terminal.id,
        region=organisation.region_code, after={"overlap_seconds": overlap_seconds},
    )  # fmt: skip
    await session.commit()
    return api_key


def terminal_key(public_key: bytes, algorithm: str | None) -> PublicKey:
    """A terminal's request-signing key: Ed25519 (32 bytes) or SM2 with SM3 (the 65-byte point), checked.

    `algorithm` None means: the key's form says which; given, it must agree with the form.
    """
    try:
        form = algorithm_of_public(public_key)
    except ValueError:
        raise errors.Invalid(
            "public_key must be a 32-byte Ed25519 key or a 65-byte uncompressed SM2 point (04 ‖ x ‖ y)"
        ) from None
    if algorithm is not None and algorithm != form:
        raise errors.Invalid(f"public_key is the form of an {form} key, not of {algorithm}")
    if form == ED25519 and not nacl.bindings.crypto_core_ed25519_is_valid_point(public_key):
        # A small-order or non-canonical point would lock the terminal out: nothing verifies under it.
        raise errors.Invalid("public_key must be a valid 32-byte Ed25519 public key")
    try:
        return algorithm_public_key(form, public_key, region="")
    except ValueError as exc:  # an SM2 point off the curve
        raise errors.Invalid(f"public_key: {exc}") from None


async def set_signing_key(
    session: AsyncSession,
    actor: Actor,
    terminal: Terminal,
    organisation: VerifierOrganisation,
    public_key: bytes,
    algorithm: str | None = None,
) -> None:
    """Register the terminal's Ed25519 or SM2 key; its API keys stop working (commits)."""
    key = terminal_key(public_key, algorithm)
    terminal.signing_public_key = public_key
    terminal.previous_key_hash = None
    terminal.previous_key_expires_at = None
    terminal.directory_version = await next_directory_version(session)
    record(
        session, actor, "terminal.signing_key_registered", subject_type="terminal", subject_id=terminal.id,
        region=organisation.region_code, after={"key_id": key.kid.hex(), "algorithm": name_of(key)},
    )  # fmt: skip
    await session.commit()

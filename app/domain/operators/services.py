"""Operator accounts: argon2-hashed passwords, roles, and the regions they may act in."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import Operator
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.regions.scope import ALL_REGIONS, covers
from app.domain.regions.services import check_region_code
from app.security.passwords import DUMMY_HASH, hash_secret, verify_secret
from app.security.tokens import OperatorSession

MIN_PASSWORD_LENGTH = 12
MAX_FAILED_SIGN_INS = 5
SIGN_IN_LOCK = timedelta(minutes=15)


class Role(StrEnum):
    """What an operator may do."""

    ADMIN = "admin"
    CARD_OFFICER = "card_officer"
    VERIFIER_MANAGER = "verifier_manager"
    AUDITOR = "auditor"


def check_regions(regions: list[str]) -> list[str]:
    """Region codes or '*' (all regions); at least one."""
    if not regions:
        raise errors.Invalid("an operator needs at least one region (or '*')")
    return [region if region == ALL_REGIONS else check_region_code(region) for region in regions]


async def create_operator(
    session: AsyncSession, actor: Actor, *, username: str, password: str, role: Role, regions: list[str]
) -> Operator:
    """Create an operator account (commits)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise errors.Invalid(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if await session.scalar(select(Operator.id).where(Operator.username == username)) is not None:
        raise errors.Conflict(f"operator {username!r} exists")
    operator = Operator(
        username=username,
        password_hash=await hash_secret(password),
        role=role.value,
        regions=check_regions(regions),
        created_at=utcnow(),
    )
    session.add(operator)
    await session.flush()
    record(
        session, actor, "operator.created", subject_type="operator", subject_id=operator.id,
        region=None, after={"username": username, "role": role.value, "regions": operator.regions},
    )  # fmt: skip
    await session.commit()
    return operator


async def authenticate(session: AsyncSession, username: str, password: str) -> OperatorSession:
    """The session of the operator with these credentials; one answer for every failure.

    Guessing is limited per account, not per address: each sign-in takes one of five tries
    (atomically, before the comparison, so parallel guesses gain nothing); the fifth wrong one
    locks the account for 15 minutes. A locked account gets the same answer as a wrong
    password, so the lock tells a guesser nothing either.
    """
    failed = errors.Unauthenticated("username or password is wrong, or the account is locked for a while")
    operator = await session.scalar(select(Operator).where(Operator.username == username))
    if operator is None:
        await verify_secret(DUMMY_HASH, password)
        raise failed
    now = utcnow()
    reserved = await session.execute(
        update(Operator)
        .where(
            Operator.id == operator.id,
            Operator.failed_sign_ins < MAX_FAILED_SIGN_INS,
            or_(Operator.locked_until.is_(None), Operator.locked_until <= now),
        )
        .values(failed_sign_ins=Operator.failed_sign_ins + 1)
        .returning(Operator.failed_sign_ins)
        # The database decides; evaluating the WHERE in Python against the loaded row would compare
        # SQLite's naive datetimes with aware ones.
        .execution_options(synchronize_session=False)
    )
    taken = reserved.scalar_one_or_none()
    await session.commit()
    if taken is None:
        await verify_secret(DUMMY_HASH, password)
        raise failed
    if not await verify_secret(operator.password_hash, password):
        if taken >= MAX_FAILED_SIGN_INS:
            await session.execute(
                update(Operator)
                .where(Operator.id == operator.id)
                .values(failed_sign_ins=0, locked_until=now + SIGN_IN_LOCK)
            )
            await session.commit()
        raise failed
    await session.execute(
        update(Operator).where(Operator.id == operator.id).values(failed_sign_ins=0, locked_until=None)
    )
    await session.commit()
    return OperatorSession(
        operator_id=operator.id, username=operator.username, role=operator.role, regions=tuple(operator.regions)
    )


def require_role(operator: OperatorSession, *roles: Role) -> None:
    """403 unless the operator has one of roles (admins may do everything)."""
    if operator.role != Role.ADMIN and operator.role not in roles:
        raise errors.Forbidden(f"role {operator.role} may not do this")


def require_region(operator: OperatorSession, region: str) -> None:
    """403 unless region lies in the operator's scope."""
    if not covers(operator.regions, region):
        raise errors.Forbidden(f"region {region} is outside this operator's scope")

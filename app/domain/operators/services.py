"""Operator accounts: argon2-hashed passwords, roles, and the regions they may act in."""

from __future__ import annotations

from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import problems
from app.clock import utcnow
from app.db.models import Operator
from app.domain.regions.services import check_region_code
from app.tokens import OperatorSession

ALL_REGIONS = "*"
MIN_PASSWORD_LENGTH = 12

_hasher = PasswordHasher()
# Verified when the username is unknown, so a miss costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a real password, only for timing")


class Role(StrEnum):
    """What an operator may do."""

    ADMIN = "admin"
    CARD_OFFICER = "card_officer"
    VERIFIER_MANAGER = "verifier_manager"
    AUDITOR = "auditor"


def check_regions(regions: list[str]) -> list[str]:
    """Region codes or '*' (all regions); at least one."""
    if not regions:
        raise problems.bad_request("an operator needs at least one region (or '*')")
    return [region if region == ALL_REGIONS else check_region_code(region) for region in regions]


async def create_operator(
    session: AsyncSession, *, username: str, password: str, role: Role, regions: list[str]
) -> Operator:
    """Create an operator account (commits)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise problems.bad_request(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if await session.scalar(select(Operator.id).where(Operator.username == username)) is not None:
        raise problems.conflict(f"operator {username!r} exists")
    operator = Operator(
        username=username,
        password_hash=_hasher.hash(password),
        role=role.value,
        regions=check_regions(regions),
        created_at=utcnow(),
    )
    session.add(operator)
    await session.commit()
    return operator


async def authenticate(session: AsyncSession, username: str, password: str) -> OperatorSession:
    """The session of the operator with these credentials; one answer for every failure."""
    operator = await session.scalar(select(Operator).where(Operator.username == username))
    try:
        _hasher.verify(operator.password_hash if operator else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        operator = None
    if operator is None:
        raise problems.unauthorized("username or password is wrong")
    return OperatorSession(
        operator_id=operator.id, username=operator.username, role=operator.role, regions=tuple(operator.regions)
    )


def require_role(operator: OperatorSession, *roles: Role) -> None:
    """403 unless the operator has one of roles (admins may do everything)."""
    if operator.role != Role.ADMIN and operator.role not in roles:
        raise problems.forbidden(f"role {operator.role} may not do this")


def require_region(operator: OperatorSession, region: str) -> None:
    """403 unless region lies in the operator's scope."""
    if ALL_REGIONS not in operator.regions and region not in operator.regions:
        raise problems.forbidden(f"region {region} is outside this operator's scope")

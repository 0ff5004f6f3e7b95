"""The holder's 6-digit PIN: the step-up before medical credentials and undoing a loss report.

Stored only as an argon2 hash. Each verification takes one of five tries before comparing
(atomically, so parallel guesses gain nothing); five wrong tries lock the PIN until the card
office resets it.
"""

from __future__ import annotations

import itertools
import re

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import ECard
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.security.passwords import hash_secret, verify_secret
from app.security.tokens import HolderSession

MAX_PIN_ATTEMPTS = 5
_PIN = re.compile(r"^[0-9]{6}$")


def check_pin_rules(pin: str) -> None:
    """Six digits, not one digit repeated, not a run like 123456 or 987654."""
    if not _PIN.fullmatch(pin):
        raise errors.Invalid("the PIN must be exactly 6 digits")
    steps = {int(b) - int(a) for a, b in itertools.pairwise(pin)}
    if len(set(pin)) == 1 or steps in ({1}, {-1}):
        raise errors.Invalid("the PIN is too easy to guess (repeated or consecutive digits)")


async def _check(session: AsyncSession, ecard: ECard, pin: str) -> None:
    """Take a try, compare, and reset the count on success; 401 or 403 (locked) otherwise."""
    if ecard.pin_hash is None:
        raise errors.Conflict("no PIN is set for this card", code="pin_not_set")
    reserved = await session.execute(
        update(ECard)
        .where(ECard.id == ecard.id, ECard.pin_attempts < MAX_PIN_ATTEMPTS)
        .values(pin_attempts=ECard.pin_attempts + 1)
        .returning(ECard.pin_attempts)
    )
    taken = reserved.scalar_one_or_none()
    await session.commit()
    if taken is None:
        raise errors.Forbidden("the PIN is locked after 5 wrong tries; ask the card office", code="pin_locked")
    if not await verify_secret(ecard.pin_hash, pin):
        left = MAX_PIN_ATTEMPTS - taken
        if left == 0:
            raise errors.Forbidden("wrong PIN; the PIN is now locked, ask the card office", code="pin_locked") from None
        raise errors.Unauthenticated("wrong PIN", code="pin_wrong", attempts_left=left) from None
    await session.execute(update(ECard).where(ECard.id == ecard.id).values(pin_attempts=0))
    await session.commit()


async def set_pin(
    session: AsyncSession, holder: HolderSession, ecard: ECard, new_pin: str, current_pin: str | None
) -> None:
    """Set the first PIN, or change it with the current one."""
    check_pin_rules(new_pin)
    if ecard.pin_hash is not None:
        if current_pin is None:
            raise errors.Invalid("changing the PIN needs current_pin")
        await _check(session, ecard, current_pin)
    await session.execute(
        update(ECard).where(ECard.id == ecard.id).values(pin_hash=await hash_secret(new_pin), pin_attempts=0)
    )
    record(
        session, Actor.holder(holder), "ecard.pin_set", subject_type="ecard", subject_id=ecard.id,
        region=ecard.region_code, after={"pin_set": True},
    )  # fmt: skip
    await session.commit()


async def verify_pin(session: AsyncSession, ecard: ECard, pin: str) -> None:
    """Check the PIN (the caller then issues a step-up token)."""
    if not _PIN.fullmatch(pin):
        raise errors.Invalid("the PIN must be exactly 6 digits")
    await _check(session, ecard, pin)


async def reset_pin(session: AsyncSession, actor: Actor, ecard: ECard, reason: str) -> None:
    """The card office clears a forgotten or locked PIN after checking the holder's identity."""
    before = {"pin_set": ecard.pin_hash is not None, "pin_attempts": ecard.pin_attempts}
    await session.execute(update(ECard).where(ECard.id == ecard.id).values(pin_hash=None, pin_attempts=0))
    record(
        session, actor, "ecard.pin_reset", subject_type="ecard", subject_id=ecard.id, region=ecard.region_code,
        reason=reason, before=before, after={"pin_set": False, "pin_attempts": 0},
    )  # fmt: skip
    await session.commit()

"""The holder's devices: list, rename, remove (which ends that device's sessions at once)."""

from __future__ import annotations

import uuid

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import Device, ECard, RefreshToken
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.cards.mirroring import MirrorOutbox, stage_device
from app.security.tokens import HolderSession


async def list_devices(session: AsyncSession, holder: HolderSession) -> list[Device]:
    """The devices bound to the holder's eCard, oldest first."""
    query = (
        select(Device)
        .where(Device.ecard_id == holder.ecard_id, Device.revoked_at.is_(None))
        .order_by(Device.created_at)
    )
    return list((await session.scalars(query)).all())


async def _own_device(session: AsyncSession, holder: HolderSession, device_id: uuid.UUID) -> Device:
    device = await session.get(Device, device_id)
    if device is None or device.ecard_id != holder.ecard_id or device.revoked_at is not None:
        raise errors.NotFound("no such device")
    return device


async def rename_device(session: AsyncSession, holder: HolderSession, device_id: uuid.UUID, name: str) -> Device:
    """Give a device a name the holder recognises."""
    device = await _own_device(session, holder, device_id)
    device.name = name.strip() or device.name
    await session.commit()
    return device


async def remove_device(
    session: AsyncSession, outbox: MirrorOutbox, holder: HolderSession, device_id: uuid.UUID, session_ttl: int
) -> bool:
    """Unbind a device: its refresh tokens die now, its access tokens are refused from now on (False: once the
    status store answers again; the change is queued)."""
    device = await _own_device(session, holder, device_id)
    now = utcnow()
    device.revoked_at = now
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.device_id == device.id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    ecard = await session.get(ECard, holder.ecard_id)
    record(
        session, Actor.holder(holder), "device.removed", subject_type="device", subject_id=device.id,
        region=ecard.region_code if ecard else None, before={"name": device.name},
    )  # fmt: skip
    stage_device(session, holder.ecard_id, device.id, session_ttl)
    await session.commit()
    return await outbox.publish([holder.ecard_id])

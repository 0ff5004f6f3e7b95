"""Refilling the status mirror from the database: fast, resumable, one process at a time, safe beside the service.

A rebuild reads eCards in pages by id (keyset: no OFFSET), a page's entitlements in one query and each
eCard's sealed profile from its own row (nothing is decrypted or encrypted per card; a profile not kept
yet is sealed and kept on the way), and writes a page with one `mirror_many` while the next is read.
Every write carries the eCard's mirror version, so a change committed during the rebuild wins whichever
write lands last. After each page its last id is committed as the checkpoint, with the lease: a rebuild
restarted after a crash goes on after it, unless the store lost its data again since (its epoch moved).

`MirrorRecovery` runs in every worker: when the store's epoch is not the one the last complete fill was
made in (Redis came back empty), the worker that takes the lease refills it, flagging the store as
refilling meanwhile; `DatabaseFallback` answers scans of cards not mirrored yet from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.clock import utcnow
from app.db.models import ECard, MirrorRebuild
from app.domain.bulk import fewer_collections
from app.domain.cards.services import (
    STATUS_OF_STATE,
    entitlements_of,
    mirror_entries,
    mirror_rows,
    seal_missing_profiles,
)
from app.observability import metrics
from app.security.pii import PiiCipher
from app.stores.status_mirror import CardRecord, MirrorEntry, StatusMirror, StoreUnavailable

logger = logging.getLogger(__name__)

# The card whose shard's epoch stands for the store's: no eCard has this reference (they are random),
# and the scan script and the holder state open a shard's epoch the same way when it is missing.
PROBE_REF = bytes(16)
PROBE_DEVICE = uuid.UUID(int=0)
PAGE = 10_000
# Pages being written to the store at once, beside the one being read.
IN_FLIGHT = 3
LEASE_TTL = timedelta(seconds=30)
# The refilling flag lives this long unless renewed (every RENEW_EVERY seconds while a rebuild runs).
REFILLING_TTL = 30
RENEW_EVERY = 5.0


class RebuildBusy(Exception):
    """Another process holds the rebuild's lease."""


class LeaseLost(Exception):
    """The lease expired and another process took it: this rebuild stops (the other goes on)."""


class StoreLostAgain(Exception):
    """The store's epoch moved during the rebuild: what was written so far is gone."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a rebuild is: cards done (with those of the run it resumed), of about total."""

    done: int
    total: int
    resumed_from: int
    seconds: float

    @property
    def rate(self) -> float:
        """Cards per second in this run."""
        return (self.done - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at this run's rate (None before it has one)."""
        return max(self.total - self.done, 0) / self.rate if self.rate > 0 else None


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What a rebuild did: cards sent (with those before its checkpoint), written (the rest were older than
    the store's), profiles it had to seal, and whether it went on from a checkpoint."""

    cards: int
    written: int
    profiles_sealed: int
    resumed_from: int
    seconds: float

    @property
    def rate(self) -> float:
        """Cards per second in this run."""
        return (self.cards - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0


def process_name() -> str:
    """Who holds a lease: host, process, and a nonce (a restarted process is another holder)."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def store_epoch(mirror: StatusMirror) -> int:
    """The store's epoch (its probe shard's, opened now if missing): it changes when the store loses its data."""
    return (await mirror.holder_state(PROBE_REF, PROBE_DEVICE)).epoch_ms


async def _ensure_row(session: AsyncSession, prefix: str, filled_epoch_ms: int | None = None) -> bool:
    """Create the store's rebuild row if there is none; whether this call created it."""
    if await session.get(MirrorRebuild, prefix) is not None:
        return False
    session.add(MirrorRebuild(prefix=prefix, filled_epoch_ms=filled_epoch_ms, cards_done=0))
    try:
        await session.commit()
    except IntegrityError:  # another process was first
        await session.rollback()
        return False
    return True


class Rebuilder:
    """One rebuild of one store (by its key prefix) by one holder of the lease."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        mirror: StatusMirror,
        pii: PiiCipher,
        prefix: str,
        *,
        holder: str | None = None,
        page: int = PAGE,
        in_flight: int = IN_FLIGHT,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._mirror = mirror
        self._pii = pii
        self._prefix = prefix
        self.holder = holder or process_name()
        self._page = page
        self._in_flight = max(in_flight, 1)
        self._on_progress = on_progress
        self._done = self._written = self._resumed_from = self._total = self._epoch = 0
        self._started = self._renewed = 0.0

    async def run(self, *, restart: bool = False) -> RebuildReport:
        """Fill the store from the database, from the checkpoint unless restart; raises RebuildBusy, LeaseLost."""
        await self._take_lease()
        try:
            with fewer_collections():
                while True:
                    try:
                        return await self._fill(restart)
                    except StoreLostAgain:
                        logger.warning("the status store lost its data during the rebuild; starting over")
                        restart = True
        finally:
            await self._release()

    async def _take_lease(self) -> None:
        now = utcnow()
        async with self._sessions() as session:
            await _ensure_row(session, self._prefix)
            taken = await session.execute(
                update(MirrorRebuild)
                .where(
                    MirrorRebuild.prefix == self._prefix,
                    or_(
                        MirrorRebuild.holder.is_(None),
                        MirrorRebuild.holder == self.holder,
                        MirrorRebuild.lease_until < now,
                    ),
                )
                .values(holder=self.holder, lease_until=now + LEASE_TTL)
            )
            await session.commit()
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise RebuildBusy(f"another process is rebuilding the mirror of {self._prefix!r}")

    async def _release(self) -> None:
        with contextlib.suppress(Exception):  # an expired lease is as good as a released one
            async with self._sessions() as session:
                await session.execute(
                    update(MirrorRebuild)
                    .where(MirrorRebuild.prefix == self._prefix, MirrorRebuild.holder == self.holder)
                    .values(holder=None, lease_until=None)
                )
                await session.commit()

    async def _checkpoint(self, **values: object) -> None:
        """Commit progress and renew the lease, as its holder only (else LeaseLost)."""
        now = utcnow()
        async with self._sessions() as session:
            result = await session.execute(
                update(MirrorRebuild)
                .where(MirrorRebuild.prefix == self._prefix, MirrorRebuild.holder == self.holder)
                .values(updated_at=now, lease_until=now + LEASE_TTL, **values)
            )
            await session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise LeaseLost(f"the rebuild's lease of {self._prefix!r} was taken by another process")

    async def _start(self, restart: bool, epoch: int) -> tuple[uuid.UUID | None, int, int]:
        """Where to begin (after id, cards done) and about how many eCards there are."""
        async with self._sessions() as session:
            state = await session.get(MirrorRebuild, self._prefix)
            total = int(await session.scalar(select(func.count()).select_from(ECard)) or 0)
        assert state is not None
        if not restart and state.finished_at is None and state.epoch_ms == epoch and state.after_id is not None:
            return state.after_id, state.cards_done, total
        await self._checkpoint(epoch_ms=epoch, after_id=None, cards_done=0, started_at=utcnow(), finished_at=None)
        return None, 0, total

    async def _read(self, after: uuid.UUID | None) -> tuple[list[MirrorEntry], uuid.UUID | None, int]:
        """The next page's entries, its last id, and the profiles sealed for it (committed here)."""
        async with self._sessions() as session:
            rows = await mirror_rows(session, after, self._page)
            entries, sealed = await mirror_entries(session, self._pii, rows)
            if sealed:
                await session.commit()
        return entries, (rows[-1][0] if rows else None), sealed

    async def _fill(self, restart: bool) -> RebuildReport:
        epoch = await store_epoch(self._mirror)
        after, done, total = await self._start(restart, epoch)
        self._done, self._written, self._resumed_from, self._total = done, 0, done, total
        self._started = self._renewed = time.monotonic()
        self._epoch = epoch
        await self._mirror.set_refilling(True, REFILLING_TTL)
        sealed = 0
        # Pages being written, oldest first: a checkpoint only ever covers pages that all were.
        writing: deque[tuple[asyncio.Task[int], uuid.UUID, int]] = deque()
        reading = asyncio.ensure_future(self._read(after))
        try:
            while True:
                entries, last_id, page_sealed = await reading
                sealed += page_sealed
                if last_id is None:
                    break
                reading = asyncio.ensure_future(self._read(last_id))
                writing.append((asyncio.ensure_future(self._mirror.mirror_many(entries)), last_id, len(entries)))
                while len(writing) >= self._in_flight:
                    await self._settle(*writing.popleft())
            while writing:
                await self._settle(*writing.popleft())
        except BaseException:
            reading.cancel()
            for task, _, _ in writing:
                task.cancel()
            raise
        if await store_epoch(self._mirror) != epoch:
            raise StoreLostAgain
        await self._checkpoint(after_id=None, cards_done=self._done, finished_at=utcnow(), filled_epoch_ms=epoch)
        await self._mirror.set_refilling(False)
        metrics.rebuild_progress(self._done, max(total, self._done))
        seconds = time.monotonic() - self._started
        if self._on_progress is not None:
            self._on_progress(Progress(self._done, max(total, self._done), self._resumed_from, seconds))
        return RebuildReport(self._done, self._written, sealed, self._resumed_from, seconds)

    async def _settle(self, task: asyncio.Task[int], page_last: uuid.UUID, count: int) -> None:
        """Wait for a page's write, then checkpoint after it (and now and then renew the flag, report progress)."""
        self._written += await task
        self._done += count
        await self._checkpoint(after_id=page_last, cards_done=self._done)
        metrics.rebuild_progress(self._done, max(self._total, self._done))
        if time.monotonic() - self._renewed >= RENEW_EVERY:
            self._renewed = time.monotonic()
            await self._renew(self._epoch)
        if self._on_progress is not None:
            elapsed = time.monotonic() - self._started
            self._on_progress(Progress(self._done, self._total, self._resumed_from, elapsed))

    async def _renew(self, epoch: int) -> None:
        """Keep the refilling flag up, and stop if the store lost its data again meanwhile."""
        if await store_epoch(self._mirror) != epoch:
            raise StoreLostAgain
        await self._mirror.set_refilling(True, REFILLING_TTL)


class MirrorRecovery:
    """In every worker: notice a store that lost what was filled into it, and refill it (one worker at a time)."""

    INTERVAL = 1.0

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        mirror: StatusMirror,
        pii: PiiCipher,
        prefix: str,
        *,
        page: int = PAGE,
    ) -> None:
        self._sessions = sessions
        self._mirror = mirror
        self._pii = pii
        self._prefix = prefix
        self._page = page
        self.holder = process_name()
        self.rebuilds = 0

    async def check(self) -> RebuildReport | None:
        """Refill the store if its epoch is not the last complete fill's and nobody else is at it; the report."""
        epoch = await store_epoch(self._mirror)
        async with self._sessions() as session:
            # The first look at a store: what it holds is taken as filled (a new deployment, or one that
            # kept its mirror up by reconciling); from now on a change of epoch is a loss.
            if await _ensure_row(session, self._prefix, filled_epoch_ms=epoch):
                return None
            state = await session.get(MirrorRebuild, self._prefix)
            assert state is not None
            if state.filled_epoch_ms == epoch:
                return None
            busy = state.holder not in (None, self.holder) and state.lease_until is not None
            if busy and state.lease_until is not None and state.lease_until > utcnow():
                return None
        logger.warning("the status store lost its data (epoch %s); refilling it", epoch)
        # Every shard starts remembering now, as at start-up (a shard's first scan would open it later).
        await self._mirror.start_epochs(time.time_ns() // 1_000_000)
        rebuilder = Rebuilder(
            self._sessions, self._mirror, self._pii, self._prefix, holder=self.holder, page=self._page
        )
        try:
            report = await rebuilder.run()
        except (RebuildBusy, LeaseLost):
            return None
        self.rebuilds += 1
        logger.warning("status store refilled: %d eCards in %.1f s", report.cards, report.seconds)
        return report

    async def run(self) -> None:
        """Check every INTERVAL seconds until cancelled; a store that does not answer is checked again later."""
        while True:
            await asyncio.sleep(self.INTERVAL)
            try:
                await self.check()
            except StoreUnavailable:
                continue
            except Exception:
                logger.exception("refilling the status store failed; retrying")


class DatabaseFallback:
    """While the mirror is refilled: a card it lacks is read from the database and mirrored, at a bounded rate.

    A token bucket per worker (rate per second, a second's worth of burst) bounds the database reads a
    flood of scans can cause; over it, or with the flag down, the scan's answer stays card_unknown.
    """

    FLAG_CACHE = 0.5

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], mirror: StatusMirror, pii: PiiCipher, rate: float
    ) -> None:
        self._sessions = sessions
        self._mirror = mirror
        self._pii = pii
        self._rate = rate
        self._burst = max(rate, 1.0)
        self._tokens = self._burst
        self._filled_at = time.monotonic()
        self._flag = False
        self._flag_read_at = -self.FLAG_CACHE
        self._flag_read: asyncio.Future[None] | None = None
        self.mirrored = 0
        self.over_rate = 0

    async def _refilling(self) -> bool:
        # Read at most every FLAG_CACHE seconds, by one call that concurrent scans share: a burst of
        # card_unknown answers (truly unknown cards too) costs one store call, not one connection each.
        if time.monotonic() - self._flag_read_at >= self.FLAG_CACHE:
            if self._flag_read is None:
                self._flag_read = asyncio.ensure_future(self._read_flag())
            await asyncio.shield(self._flag_read)
        return self._flag

    async def _read_flag(self) -> None:
        try:
            self._flag = await self._mirror.refilling()
            self._flag_read_at = time.monotonic()
        finally:
            self._flag_read = None

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._filled_at) * self._rate)
        self._filled_at = now
        if self._tokens < 1:
            self.over_rate += 1
            return False
        self._tokens -= 1
        return True

    async def mirror_missing(self, card_ref: bytes) -> bool:
        """Mirror the card from the database if the store is being refilled and the rate allows; whether it was."""
        if self._rate <= 0 or not await self._refilling() or not self._take():
            return False
        try:
            async with self._sessions() as session:
                row = (
                    await session.execute(
                        select(ECard.id, ECard.state, ECard.mirror_version, ECard.sealed_profile).where(
                            ECard.card_ref == card_ref
                        )
                    )
                ).first()
                if row is None:
                    return False
                ecard_id, state, version, profile = row
                if profile is None:
                    profile = (await seal_missing_profiles(session, self._pii, [ecard_id])).get(ecard_id)
                    await session.commit()
                entitlements = await entitlements_of(session, ecard_id)
        except Exception:
            # The database failing here must not turn a card_unknown into a 500.
            logger.exception("reading a card the mirror lacks from the database failed")
            return False
        records = {CardRecord.PROFILE: profile, CardRecord.ENTITLEMENTS: entitlements}
        await self._mirror.mirror_card(card_ref, version, STATUS_OF_STATE[state], records)
        self.mirrored += 1
        return True

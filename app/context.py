"""The process-wide objects a running service (or a CLI command) works with, built once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import redis.asyncio as redis
from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db.engine import create_engine, create_session_factory
from app.domain.verification.directory import VerifierDirectory
from app.domain.verification.service import CredentialVerifier
from app.keyring import Keyring, load_keyring
from app.pii import PiiCipher
from app.settings import Settings
from app.stores.invalidation import InvalidationBus, LocalInvalidationBus, RedisInvalidationBus
from app.stores.status_mirror import MemoryStatusMirror, RedisStatusMirror, StatusMirror
from app.tokens import SessionTokens

logger = logging.getLogger(__name__)

STATE_KEY = "ecard"
DIRECTORY_TOPIC = "directory"


@dataclass(slots=True)
class ServiceContext:
    """Settings, secrets, database, stores and caches of one process."""

    settings: Settings
    keyring: Keyring
    pii: PiiCipher
    tokens: SessionTokens
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    mirror: StatusMirror
    bus: InvalidationBus
    directory: VerifierDirectory
    verifier: CredentialVerifier
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings) -> ServiceContext:
        """Wire everything from settings; connects nothing yet."""
        keyring = load_keyring(settings)
        pii = PiiCipher(keyring.data_key, keyring.index_key)
        engine = create_engine(settings.database_url)
        sessions = create_session_factory(engine)
        mirror: StatusMirror
        bus: InvalidationBus
        if settings.redis_url:
            mirror = RedisStatusMirror.from_url(settings.redis_url, settings.redis_prefix)
            bus_client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1.0)
            bus = RedisInvalidationBus(bus_client, f"{settings.redis_prefix}invalidate")
        else:
            mirror = MemoryStatusMirror()
            bus = LocalInvalidationBus()
        directory = VerifierDirectory(sessions, pii)
        pseudonym_key = pii.blind_index("card-pseudonym", "verification.pseudonym_key")
        verifier = CredentialVerifier(directory, mirror, pseudonym_key, settings.clock_skew)
        return cls(
            settings,
            keyring,
            pii,
            tokens=SessionTokens(keyring.session_key),
            engine=engine,
            sessions=sessions,
            mirror=mirror,
            bus=bus,
            directory=directory,
            verifier=verifier,
        )

    async def start(self) -> None:
        """Load the caches and keep them fresh in the background."""
        await self.directory.reload()
        self._tasks.append(asyncio.create_task(self.bus.run(self._on_invalidation)))
        self._tasks.append(asyncio.create_task(self._refresh_periodically()))

    async def _on_invalidation(self, topic: str) -> None:
        try:
            await self.directory.reload()
        except Exception:
            logger.exception("reloading the verifier directory after %r failed", topic)

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.cache_refresh_interval)
            await self._on_invalidation("periodic")

    async def directory_changed(self) -> None:
        """After an operator changed terminals or keys: reload here at once, and tell every worker."""
        await self.directory.reload()
        await self.bus.publish(DIRECTORY_TOPIC)

    async def close(self) -> None:
        """Stop background work and release connections."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.mirror.close()
        await self.bus.close()
        await self.engine.dispose()


def context_of(state: State) -> ServiceContext:
    """The context stored in the application state."""
    context: ServiceContext = state[STATE_KEY]
    return context

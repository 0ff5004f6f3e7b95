"""The composition root: the process-wide objects a running service (or a CLI command) works with, built once.

Nothing below imports this module. Handlers name what they need (`pii`, `mirror`, `settings`…,
see `WIRED`) and get that one object through Litestar's dependency injection; the callers object
(app.http.auth) is put in the application state for guards and hot paths.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as redis
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.types import ASGIApp, Receive, Scope, Send
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db.clock import utcnow
from app.db.engine import create_engine, create_session_factory
from app.db.models import StatusStore
from app.domain.agreements.rules import AcceptanceRules, load_rules
from app.domain.cards.mirroring import MirrorOutbox
from app.domain.cards.rebuild import DatabaseFallback, MirrorRecovery
from app.domain.cards.services import ScopedCard, card_in_scope
from app.domain.issuers.key_store import IssuerKeyStore, open_key_store
from app.domain.ledger.services import MedicalCoverage
from app.domain.verification.directory import DirectoryChanges, VerifierDirectory
from app.domain.verification.events import EventDrain, consumer_name
from app.domain.verification.offline import OfflineKits
from app.domain.verification.service import CredentialVerifier
from app.http.auth import CALLER_DEPENDENCIES, Callers
from app.security.keyring import Keyring, load_keyring
from app.security.pii import PiiCipher
from app.security.tokens import OperatorSession, SessionTokens
from app.settings import Settings
from app.stores.event_stream import EventStream, RedisEventStream
from app.stores.invalidation import InvalidationBus, LocalInvalidationBus, RedisInvalidationBus
from app.stores.status_mirror import MemoryStatusMirror, RedisStatusMirror, StatusMirror, StoreUnavailable
from crypto.hsm import HsmConfigurationError

logger = logging.getLogger(__name__)

STATE_KEY = "ecard"
# The event stream's client waits this long for a reply: longer than a drain's blocking read (1 s).
STREAM_SOCKET_TIMEOUT = 3.0


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
    rules: AcceptanceRules
    coverage: MedicalCoverage
    events: EventStream
    offline_kits: OfflineKits
    outbox: MirrorOutbox
    recovery: MirrorRecovery
    callers: Callers
    directory_changes: DirectoryChanges
    key_store: IssuerKeyStore
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _drain_task: asyncio.Task[None] | None = None
    _stop_draining: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def build(cls, settings: Settings) -> ServiceContext:
        """Wire everything from settings; connects nothing yet but the PKCS#11 token, if one is configured
        (a wrong PIN or a missing module stops here: `HsmConfigurationError`)."""
        keyring = load_keyring(settings)
        key_store = open_key_store(settings)
        pii = keyring.pii(settings.crypto_profile)
        engine = create_engine(settings.database_url)
        sessions = create_session_factory(engine)
        mirror: StatusMirror
        bus: InvalidationBus
        events: EventStream
        if settings.redis_url:
            cluster = settings.redis_cluster
            mirror = RedisStatusMirror.from_url(
                settings.redis_url, settings.redis_prefix, cluster, capacity=settings.mirror_capacity
            )
            # Its own client: a drain's blocking read must not run into the hot calls' 1 s timeout.
            options: dict[str, Any] = {"socket_timeout": STREAM_SOCKET_TIMEOUT, "socket_connect_timeout": 1.0}
            stream_client = (
                redis.RedisCluster.from_url(settings.redis_url, **options)
                if cluster
                else redis.Redis.from_url(settings.redis_url, **options)
            )
            events = RedisEventStream(stream_client, settings.redis_prefix, cluster)
            # Pub/sub reaches every node of a cluster from any one of them: a plain client suffices.
            bus_client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1.0)
            bus = RedisInvalidationBus(bus_client, f"{settings.redis_prefix}invalidate")
        else:
            memory_mirror = MemoryStatusMirror()
            mirror, events = memory_mirror, memory_mirror.events
            bus = LocalInvalidationBus()
        directory = VerifierDirectory(sessions, pii, key_store)
        pseudonym_key = pii.pseudonym_key()
        rules = load_rules(settings.agreements_file)
        fallback = DatabaseFallback(sessions, mirror, pii, settings.verify_fallback_rate)
        verifier = CredentialVerifier(directory, mirror, pii, pseudonym_key, settings, rules, fallback)
        tokens = SessionTokens(keyring.session_signer(settings.crypto_profile), keyring.session_keys())
        return cls(
            settings,
            keyring,
            pii,
            tokens=tokens,
            engine=engine,
            sessions=sessions,
            mirror=mirror,
            bus=bus,
            directory=directory,
            verifier=verifier,
            rules=rules,
            coverage=MedicalCoverage.load(settings.medical_coverage_file),
            events=events,
            offline_kits=OfflineKits(settings.status_list_ttl, settings.status_list_lifetime),
            outbox=MirrorOutbox(sessions, mirror, pii),
            recovery=MirrorRecovery(sessions, mirror, pii, settings.redis_prefix),
            callers=Callers(tokens, mirror, directory, settings.public_url),
            directory_changes=DirectoryChanges(sessions, directory, bus),
            key_store=key_store,
        )

    def install(self, state: State) -> None:
        """Make this context what the app's dependencies, guards and hot paths get."""
        state[STATE_KEY] = self
        state[Callers.STATE_KEY] = self.callers

    async def start(self) -> None:
        """Load the caches, open the store's epoch, and keep both fresh in the background.

        Every active issuer key must be usable: one in a token this process cannot open, or that the token
        does not hold as the database says, stops start-up (`HsmConfigurationError`), not the first issue.
        """
        await self.directory.reload()
        if self.directory.keys.unavailable:
            raise HsmConfigurationError("; ".join(self.directory.keys.unavailable.values()))
        await asyncio.to_thread(self.key_store.check, list(self.directory.keys.signing_keys.values()))
        await self.open_store_epochs()
        self._tasks.append(asyncio.create_task(self.bus.run(self.directory_changes.apply)))
        self._tasks.append(asyncio.create_task(self._refresh_periodically()))
        self._tasks.append(asyncio.create_task(self.outbox.run(), name="mirror-outbox"))
        self._tasks.append(asyncio.create_task(self.verifier.voids.run(), name="scan-voids"))
        if self.settings.redis_url and self.settings.mirror_recovery:
            # The in-process store is filled at start-up instead (it dies with the process).
            self._tasks.append(asyncio.create_task(self.recovery.run(), name="mirror-recovery"))
        if self.settings.drains_events:
            self._drain_task = asyncio.create_task(self.event_drain().run(self._stop_draining))

    async def open_store_epochs(self) -> None:
        """Give the status store an epoch if it has none: 0 when this deployment never used it, else now.

        An empty store that the database remembers lost its used nonces (a restart without persistence):
        from now on, codes that could have been shown before are refused until they expire. When the
        store cannot be reached, its first scan opens the epoch (at that moment) instead.
        """
        try:
            if not await self.mirror.epochs_missing():
                return
            async with self.sessions() as session:
                first_use = await session.get(StatusStore, self.settings.redis_prefix) is None
                if first_use:
                    session.add(StatusStore(prefix=self.settings.redis_prefix, first_used_at=utcnow()))
                    try:
                        await session.commit()
                    except IntegrityError:  # another worker starting with us was first: it chose
                        await session.rollback()
                        first_use = False
            epoch_ms = 0 if first_use else time.time_ns() // 1_000_000
            await self.mirror.start_epochs(epoch_ms)
        except StoreUnavailable as exc:
            logger.warning("status store unreachable at start-up (%s); its first use opens its epoch", exc)
            return
        if epoch_ms:
            logger.warning(
                "the status store is empty but was used before: it lost its memory of used codes; codes shown "
                "before now are refused until they expire (refresh_required)"
            )

    def event_drain(self, **options: int) -> EventDrain:
        """A drain of the verification event stream into this context's database."""
        return EventDrain(self.events, self.sessions, consumer_name(), **options)

    async def _refresh_periodically(self) -> None:
        """Apply the directory's changes when its counter moved (one row read a second; no full reload)."""
        while True:
            await asyncio.sleep(self.settings.directory_poll_interval)
            await self.directory_changes.apply("counter")

    async def _drain_remaining_events(self) -> None:
        """At shutdown, store what the stream still holds (in memory it would be lost)."""
        drain = self.event_drain(block_ms=0, claim_idle_ms=0)
        try:
            while await drain.run_once():
                pass
        except Exception:
            logger.exception("storing the last verification events at shutdown failed")

    async def close(self) -> None:
        """Stop background work and release connections."""
        if self._drain_task is not None:
            # Let the drain finish its batch: cancelling it inside a database call can hang the driver.
            self._stop_draining.set()
            try:
                await asyncio.wait_for(self._drain_task, 10.0)
            except TimeoutError:
                logger.error("the event drain did not stop within 10 s")
            self._drain_task = None
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that ignores its cancellation must not hold the shutdown for ever.
            _, pending = await asyncio.wait(self._tasks, timeout=5.0)
            for task in pending:
                logger.error("background task %r did not stop within 5 s; cancelling again", task.get_name())
                task.cancel()
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    logger.error("background task %r failed: %r", task.get_name(), task.exception())
        self._tasks.clear()
        if self.settings.drains_events:
            await self._drain_remaining_events()
        if len(self.verifier.voids):
            logger.error("%d scans answered 'outcome unknown' stay recorded as delivered", len(self.verifier.voids))
        await self.mirror.close()
        await self.events.close()
        await self.bus.close()
        await self.engine.dispose()
        self.key_store.close()


def context_of(state: State) -> ServiceContext:
    """The context stored in the application state."""
    context: ServiceContext = state[STATE_KEY]
    return context


# What handlers may name as a dependency: each is the context's object of that name.
WIRED = (
    "settings",
    "keyring",
    "pii",
    "tokens",
    "sessions",
    "mirror",
    "directory",
    "directory_changes",
    "verifier",
    "rules",
    "coverage",
    "offline_kits",
    "outbox",
    "key_store",
)


def _wired(name: str) -> Provide:
    def provide(state: State) -> Any:
        return getattr(state[STATE_KEY], name)

    provide.__name__ = provide.__qualname__ = f"provide_{name}"
    return Provide(provide, sync_to_thread=False)


# Where a request's database sessions wait for `close_request_sessions` (an ASGI scope extension key).
_REQUEST_SESSIONS = "ecard.db_sessions"


def db_session(request: Request[Any, Any, Any], state: State) -> AsyncSession:
    """A database session for one request; whatever it did not commit is rolled back when the request ends.

    Not a generator dependency: Litestar 2 cleans those up only when every dependency of the handler
    resolved, so a session opened beside a caller that answered 401 (or a card that answered 404)
    kept its connection until the garbage collector found it, and a burst of refusals could empty
    the pool. `close_request_sessions` closes it however the request ends.
    """
    session = context_of(state).sessions()
    cast("dict[str, Any]", request.scope).setdefault(_REQUEST_SESSIONS, []).append(session)
    return session


def close_request_sessions(app: ASGIApp) -> ASGIApp:
    """Middleware: close the database sessions the request's dependencies opened, after it is answered or failed."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        finally:
            for session in cast("dict[str, Any]", scope).pop(_REQUEST_SESSIONS, ()):
                await session.close()

    return middleware


def dependencies() -> dict[str, Provide]:
    """Every dependency a handler may name: the wired objects, a database `session`, the callers, a scoped card."""
    return {
        **{name: _wired(name) for name in WIRED},
        "session": Provide(db_session, sync_to_thread=False),
        **CALLER_DEPENDENCIES,
        # The card a `/…/{card_id}/…` path names, within the operator's regions.
        "scoped_card": Provide(scoped_card),
    }


async def scoped_card(
    session: NamedDependency[AsyncSession], operator: NamedDependency[OperatorSession], card_id: FromPath[uuid.UUID]
) -> ScopedCard:
    """The card a `/…/{card_id}/…` path names, if it lies in the operator's regions (cards.services.card_in_scope)."""
    return await card_in_scope(session, operator, card_id)

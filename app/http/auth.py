"""What handlers get injected: the caller (holder or operator session), a database session, the context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.di import Provide
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain import errors
from app.security.tokens import HolderSession, InvalidToken, OperatorSession
from app.server.context import ServiceContext, context_of

HOLDER_SECURITY: list[dict[str, list[str]]] = [{"holderToken": []}]
OPERATOR_SECURITY: list[dict[str, list[str]]] = [{"operatorToken": []}]
TERMINAL_SECURITY: list[dict[str, list[str]]] = [{"terminalApiKey": []}, {"terminalSignature": []}]


def _bearer(request: Request[Any, Any, Any]) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise errors.Unauthenticated("send 'Authorization: Bearer <token>'")
    return token.strip()


@dataclass(frozen=True, slots=True)
class AuthenticatedHolder:
    """A holder's session and, read with it in one store round trip, the card's mirrored status and its
    shard's epoch (credentials' windows start after it)."""

    session: HolderSession
    card_status: str | None
    store_epoch_ms: int = 0


async def current_holder(request: Request[Any, Any, Any]) -> AuthenticatedHolder:
    """The holder whose access token the request carries, from a device still bound; 401 otherwise."""
    context = context_of(request.app.state)
    try:
        session = context.tokens.read_holder(_bearer(request))
    except InvalidToken as exc:
        raise errors.Unauthenticated(f"access token rejected: {exc}") from None
    return await holder_on_device(context, session)


async def holder_on_device(context: ServiceContext, session: HolderSession) -> AuthenticatedHolder:
    """The holder of a valid access token, with the card's status; 401 when the device was removed."""
    state = await context.mirror.holder_state(session.card_ref, session.device_id)
    if state.device_revoked:
        raise errors.Unauthenticated("this device was removed from the card; activate it again")
    return AuthenticatedHolder(session, state.status, state.epoch_ms)


def current_operator(request: Request[Any, Any, Any]) -> OperatorSession:
    """The operator whose token the request carries; 401 otherwise."""
    try:
        return context_of(request.app.state).tokens.read_operator(_bearer(request))
    except InvalidToken as exc:
        raise errors.Unauthenticated(f"operator token rejected: {exc}") from None


def service_context(request: Request[Any, Any, Any]) -> ServiceContext:
    """The process's service context."""
    return context_of(request.app.state)


async def db_session(request: Request[Any, Any, Any]) -> AsyncIterator[AsyncSession]:
    """A database session for one request; whatever it did not commit is rolled back."""
    async with context_of(request.app.state).sessions() as session:
        yield session


DEPENDENCIES = {
    "ctx": Provide(service_context, sync_to_thread=False),
    "session": Provide(db_session),
}
provide_holder = Provide(current_holder)
provide_operator = Provide(current_operator, sync_to_thread=False)

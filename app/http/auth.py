"""Who is calling: holders, operators and terminals as dependencies, operator roles as guards.

A handler names the caller it serves (`holder`, `operator`, `terminal`) and, where it records what
it did, the audit `actor`; a controller or handler lists the roles it admits as a guard
(`guards=[requires(Role.CARD_OFFICER)]`). No handler reads a token or checks a role itself.

One `Callers` object per process (built by the composition root, app.server.context) knows the
session tokens, the status mirror and the terminal directory; the guards, the dependencies below
and the hot paths all ask it, so a token is read one way everywhere and once per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.params import HeaderParameter

from app.domain import errors
from app.domain.audit.services import Actor
from app.domain.operators.services import Role, require_role
from app.domain.verification.directory import TerminalEntry, VerifierDirectory
from app.security.tokens import HolderSession, InvalidToken, OperatorSession, SessionTokens
from app.stores.status_mirror import StatusMirror

if TYPE_CHECKING:
    from litestar.handlers.base import BaseRouteHandler

HOLDER_SECURITY: list[dict[str, list[str]]] = [{"holderToken": []}]
OPERATOR_SECURITY: list[dict[str, list[str]]] = [{"operatorToken": []}]
TERMINAL_SECURITY: list[dict[str, list[str]]] = [{"terminalApiKey": []}, {"terminalSignature": []}]

# A terminal's API key; absent when the terminal signs its requests instead.
TerminalApiKey = Annotated[str | None, HeaderParameter(name="X-Api-Key", required=False)]

_OPERATOR_SCOPE_KEY = "ecard.operator"


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None when it is not one."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True, slots=True)
class AuthenticatedHolder:
    """A holder's session and, read with it in one store round trip, the card's mirrored status and its
    shard's epoch (credentials' windows start after it)."""

    session: HolderSession
    card_status: str | None
    store_epoch_ms: int = 0


class Callers:
    """Establishes who is calling, for guards, dependencies and the hot paths alike."""

    STATE_KEY = "ecard.callers"

    __slots__ = ("directory", "mirror", "tokens")

    def __init__(self, tokens: SessionTokens, mirror: StatusMirror, directory: VerifierDirectory) -> None:
        self.tokens = tokens
        self.mirror = mirror
        self.directory = directory

    @classmethod
    def of(cls, connection: ASGIConnection[Any, Any, Any, Any]) -> Callers:
        """The process's callers object, as the composition root put it in the application state."""
        callers: Callers = connection.app.state[cls.STATE_KEY]
        return callers

    def operator(self, connection: ASGIConnection[Any, Any, Any, Any]) -> OperatorSession:
        """The operator whose token the request carries (read once per request); 401 otherwise."""
        scope_state = connection.scope.setdefault("state", {})
        known: OperatorSession | None = scope_state.get(_OPERATOR_SCOPE_KEY)
        if known is not None:
            return known
        token = bearer_token(connection.headers.get("authorization", ""))
        if token is None:
            raise errors.Unauthenticated("send 'Authorization: Bearer <token>'")
        try:
            operator = self.tokens.read_operator(token)
        except InvalidToken as exc:
            raise errors.Unauthenticated(f"operator token rejected: {exc}") from None
        scope_state[_OPERATOR_SCOPE_KEY] = operator
        return operator

    async def holder(self, authorization: str) -> AuthenticatedHolder:
        """The holder whose access token `authorization` carries, from a device still bound; 401 otherwise."""
        token = bearer_token(authorization)
        if token is None:
            raise errors.Unauthenticated("send 'Authorization: Bearer <token>'")
        try:
            session = self.tokens.read_holder(token)
        except InvalidToken as exc:
            raise errors.Unauthenticated(f"access token rejected: {exc}") from None
        return await self.holder_on_device(session)

    async def holder_on_device(self, session: HolderSession) -> AuthenticatedHolder:
        """The holder of a valid access token, with the card's status; 401 when the device was removed."""
        state = await self.mirror.holder_state(session.card_ref, session.device_id)
        if state.device_revoked:
            raise errors.Unauthenticated("this device was removed from the card; activate it again")
        return AuthenticatedHolder(session, state.status, state.epoch_ms)

    def terminal_by_key(self, api_key: str) -> TerminalEntry | None:
        """The enabled terminal of this API key, or None (the hot path then hands the request on)."""
        return self.directory.authenticate(api_key)

    async def terminal(self, request: Request[Any, Any, Any], api_key: str | None) -> TerminalEntry:
        """The terminal making the request, by API key or by its request signature; 401 otherwise."""
        if api_key is not None:
            terminal = self.directory.authenticate(api_key)
            if terminal is None:
                raise errors.Unauthenticated(
                    "unknown, disabled or malformed terminal API key (X-Api-Key), or the terminal signs its requests"
                )
            return terminal
        headers = request.headers
        terminal_id = headers.get("x-terminal-id")
        signature = headers.get("x-signature")
        timestamp = headers.get("x-signature-timestamp")
        if not (terminal_id and signature and timestamp):
            raise errors.Unauthenticated("send X-Api-Key, or X-Terminal-Id, X-Signature-Timestamp and X-Signature")
        body = await request.body()
        terminal = self.directory.authenticate_signed(
            terminal_id, timestamp, signature, request.method, request.url.path, body
        )
        if terminal is None:
            raise errors.Unauthenticated("request signature does not verify, is too old, or the terminal is disabled")
        return terminal


def requires(*roles: Role) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    """A guard: the caller is an operator with one of roles (admins may do everything); 401 or 403 otherwise.

    No roles: admins only.
    """

    def operator_has_role(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        require_role(Callers.of(connection).operator(connection), *roles)

    operator_has_role.__qualname__ = f"requires({', '.join(role.value for role in roles) or 'admin'})"
    return operator_has_role


def signed_in(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A guard: the caller is an operator, of any role; 401 otherwise."""
    Callers.of(connection).operator(connection)


def current_operator(request: Request[Any, Any, Any]) -> OperatorSession:
    """The operator calling (already read by the guard, if the handler has one)."""
    return Callers.of(request).operator(request)


def audit_actor(operator: NamedDependency[OperatorSession]) -> Actor:
    """The operator calling, as the audit log names who did something."""
    return Actor.operator(operator)


async def current_holder(request: Request[Any, Any, Any]) -> AuthenticatedHolder:
    """The holder calling, from a device still bound."""
    return await Callers.of(request).holder(request.headers.get("authorization", ""))


async def current_terminal(request: Request[Any, Any, Any], api_key: TerminalApiKey = None) -> TerminalEntry:
    """The terminal calling, by its API key or its request signature."""
    return await Callers.of(request).terminal(request, api_key)


# Resolved only for the handlers that name them.
CALLER_DEPENDENCIES = {
    "operator": Provide(current_operator, sync_to_thread=False),
    "actor": Provide(audit_actor, sync_to_thread=False),
    "holder": Provide(current_holder),
    "terminal": Provide(current_terminal),
}

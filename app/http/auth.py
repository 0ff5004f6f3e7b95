"""Who is calling: holders, operators and terminals as dependencies, operator roles as guards.

A handler names the caller it serves (`holder`, `operator`, `terminal`) and, where it records what
it did, the audit `actor`; a controller or handler lists the roles it admits as a guard
(`guards=[requires(Role.CARD_OFFICER)]`). No handler reads a token or checks a role itself.

One `Callers` object per process (built by the composition root, app.server.context) knows the
session tokens, the status mirror and the terminal directory; the guards, the dependencies below
and the hot paths all ask it, so a token is read one way everywhere and once per request.

Holders prove possession of their device key on every request (DPoP, RFC 9449; docs/dpop.md):
`Authorization: DPoP <access token>` and a `DPoP` proof by the key the token's `cnf.jkt` names,
for this method and URI, used once. Activation and refresh carry a proof without a token.
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
from app.http.problems import DPOP_PROOF_SCHEME
from app.security.tokens import HolderSession, InvalidToken, OperatorSession, SessionTokens
from app.stores.status_mirror import StatusMirror
from crypto.dpop import DpopError, DpopRefusal, Proof, SeenProofs, check_proof

if TYPE_CHECKING:
    from litestar.handlers.base import BaseRouteHandler

HOLDER_SECURITY: list[dict[str, list[str]]] = [{"holderToken": [], DPOP_PROOF_SCHEME: []}]
# Activation and refresh: a DPoP proof by the device key, no access token yet.
DEVICE_PROOF_SECURITY: list[dict[str, list[str]]] = [{DPOP_PROOF_SCHEME: []}]
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


def dpop_token(authorization: str) -> str | None:
    """The token of an `Authorization: DPoP <token>` value, or None when it is not one."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "dpop" and token else None


def request_uri(public_url: str, scheme: str, host: str | None, raw_path: str) -> str:
    """The URI a DPoP proof must name (its `htu`): the public base URL, or this request's scheme and host, and path.

    `raw_path` is the path as the client sent it (percent-encoding kept), any query dropped.
    """
    path = raw_path.split("?", 1)[0] or "/"
    if public_url:
        return public_url + path
    return f"{scheme}://{host or ''}{path}"


def scope_uri(scope: Any, host: str | None, public_url: str) -> str:
    """`request_uri` of an ASGI HTTP scope, its Host header given (the hot path reads it beside the rest)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope["path"]
    return request_uri(public_url, scope.get("scheme", "http"), host, path)


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

    __slots__ = ("directory", "mirror", "public_url", "seen_proofs", "tokens")

    def __init__(
        self,
        tokens: SessionTokens,
        mirror: StatusMirror,
        directory: VerifierDirectory,
        public_url: str = "",
        seen_proofs: SeenProofs | None = None,
    ) -> None:
        self.tokens = tokens
        self.mirror = mirror
        self.directory = directory
        self.public_url = public_url
        # DPoP proofs accepted in the last minute, by this process (docs/dpop.md: replays across workers).
        self.seen_proofs = seen_proofs if seen_proofs is not None else SeenProofs()

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

    def device_proof(
        self, proof: str | None, method: str, uri: str, *, access_token: str | None = None, jkt: str | None = None
    ) -> Proof:
        """The device key a request's DPoP proof proves, checked for this request and used once; 401 otherwise.

        Without `jkt` (activation, refresh) the key is checked as a new one (its curve point too).
        """
        if proof is None:
            raise errors.DeviceUnproven(
                "send a DPoP proof (RFC 9449) signed by the device key in the 'DPoP' header", reason="missing"
            )
        try:
            checked = check_proof(proof, method=method, uri=uri, access_token=access_token, jkt=jkt)
            self.seen_proofs.first_use(checked)
        except DpopError as exc:
            raise errors.DeviceUnproven(f"DPoP proof refused: {exc.detail}", reason=exc.reason.value) from None
        return checked

    async def holder(self, authorization: str, proof: str | None, method: str, uri: str) -> AuthenticatedHolder:
        """The holder whose DPoP-bound access token `authorization` carries, proven by `proof` for this request
        (method and URI), from a device still bound; 401 otherwise. The one check of holder requests."""
        token = dpop_token(authorization)
        if token is None:
            if bearer_token(authorization) is not None:
                raise errors.DeviceUnproven(
                    "holder tokens are bound to the device key: send 'Authorization: DPoP <token>' and a DPoP proof",
                    refused="token",
                    code="dpop_required",
                )
            raise errors.DeviceUnproven(
                "send 'Authorization: DPoP <token>' and a DPoP proof", refused=None, code="unauthorized"
            )
        try:
            session = self.tokens.read_holder(token)
        except InvalidToken as exc:
            raise errors.DeviceUnproven(f"access token rejected: {exc}", refused="token", code="unauthorized") from None
        self.device_proof(proof, method, uri, access_token=token, jkt=session.jkt)
        return await self.holder_on_device(session)

    async def holder_on_device(self, session: HolderSession) -> AuthenticatedHolder:
        """The holder of a valid access token, with the card's status; 401 when the device was removed."""
        state = await self.mirror.holder_state(session.card_ref, session.device_id)
        if state.device_revoked:
            # The token is no longer good: a DPoP challenge, as for any other holder token refused.
            raise errors.DeviceUnproven(
                "this device was removed from the card; activate it again", refused="token", code="unauthorized"
            )
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


def _one_proof(request: Request[Any, Any, Any]) -> str | None:
    """The request's DPoP header; a request with two is refused (RFC 9449 §4.3: exactly one)."""
    proofs = request.headers.getall("dpop", [])
    if len(proofs) > 1:
        raise errors.DeviceUnproven("send exactly one DPoP header", reason=DpopRefusal.MALFORMED.value)
    return proofs[0] if proofs else None


def _uri_of(callers: Callers, request: Request[Any, Any, Any]) -> str:
    return scope_uri(request.scope, request.headers.get("host"), callers.public_url)


async def current_holder(request: Request[Any, Any, Any]) -> AuthenticatedHolder:
    """The holder calling, proving its device key for this request, from a device still bound."""
    callers = Callers.of(request)
    authorization = request.headers.get("authorization", "")
    return await callers.holder(authorization, _one_proof(request), request.method, _uri_of(callers, request))


def current_device_proof(request: Request[Any, Any, Any]) -> Proof:
    """The device key the request's DPoP proof proves, bound to no token yet (activation, refresh)."""
    callers = Callers.of(request)
    return callers.device_proof(_one_proof(request), request.method, _uri_of(callers, request))


async def current_terminal(request: Request[Any, Any, Any], api_key: TerminalApiKey = None) -> TerminalEntry:
    """The terminal calling, by its API key or its request signature."""
    return await Callers.of(request).terminal(request, api_key)


# Resolved only for the handlers that name them.
CALLER_DEPENDENCIES = {
    "operator": Provide(current_operator, sync_to_thread=False),
    "actor": Provide(audit_actor, sync_to_thread=False),
    "holder": Provide(current_holder),
    "device_proof": Provide(current_device_proof, sync_to_thread=False),
    "terminal": Provide(current_terminal),
}

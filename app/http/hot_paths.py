"""The two rush-hour requests answered on plain ASGI, in front of Litestar's routing.

A gate's scan (`POST /v1/verify`) and an open QR screen's refresh (`POST /v1/holder/credentials`)
are the requests the service must answer at peak rates, and Litestar's routing, dependency
injection, parameter extraction and response objects cost about as much CPU as the work itself
(docs/performance.md). So a plain request to either — its credential header present, a
`Content-Length` within the route's limit, a body that decodes — is answered here by the same
function the routed handler calls, its answer encoded from the same response Struct. A route may
read more headers beside its credential (the credential refresh: `DPoP` and `Host`, for the same
`Callers.holder` check the routed dependency makes); a request with one of them twice is handed on.

Everything else is handed on to the routed handler unchanged, body included: signed requests,
unknown keys or tokens, chunked, oversized or malformed bodies, a Content-Type other than
`application/json`, a key given twice (app/http/json_bodies.py has the rules). Their problem answers
keep one source. Problems raised while answering (403, 409, 429, 503…) are rendered by Litestar's
problem-details response; an unexpected error by the app's own 500 handler.

Each hot route is declared with the routed handler it stands in for: its path and body limit are
read from the app's routes at start-up (renaming the route moves its hot path along; a handler the
app does not route stops the start-up instead of silently turning the fast path off). The OpenAPI
document describes the routed handlers; tests hold both ways to the same answers.
App-wide middleware (CORS, tracing…) added to Litestar later does not see the requests answered
here: give them the same treatment in this class, or leave the route out of it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from litestar import Request
from litestar.enums import ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.routes import HTTPRoute

from app.domain import errors
from app.http import problems
from app.http.json_bodies import duplicate_key, is_json_content_type

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import ASGIApp, HTTPRequestEvent, HTTPResponseStartEvent, Receive, ReceiveMessage, Scope, Send

Body = TypeVar("Body", bound=msgspec.Struct)

_JSON_HEADERS = (b"content-type", b"application/json")
_JSON_TYPE = b"application/json"
_encode = msgspec.json.Encoder().encode


Answer = Callable[..., Awaitable[msgspec.Struct | None]]


@dataclass(frozen=True, slots=True)
class HotRoute:
    """A POST handler's plain requests, answered in front of the router.

    `answer(credential, body, **wired)` gets the value of `credential_header`, the raw body and, by
    the names of its other parameters, the wired objects it needs (bound once at start-up); it
    returns the response Struct (sent with 200), or None to hand the request on to the routed
    handler — only before it did anything. It raises a domain error (app.domain.errors) for a
    problem to send. An answer that names `headers` gets the `also_read` headers present (a request
    with one of them twice is handed on); one that names `scope` gets the ASGI scope.
    """

    handler: HTTPRouteHandler
    credential_header: bytes
    answer: Answer
    also_read: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class _Bound:
    """A hot route as the app routes its handler: path, body limit, and its answer with what it needs."""

    path: str
    max_body: int
    credential_header: bytes
    answer: Callable[..., Awaitable[msgspec.Struct | None]]
    also_read: frozenset[bytes]
    # Whether the answer takes the `headers` read and the `scope`.
    takes_headers: bool
    takes_scope: bool


def _bind(app: Litestar, route: HotRoute, wired: object) -> _Bound:
    routed = [
        (http_route.path, handler)
        for http_route in app.routes
        if isinstance(http_route, HTTPRoute)
        for handler in http_route.route_handlers
        # (a controller's handlers are copies, their function bound to the controller)
        if getattr(handler.fn, "__func__", handler.fn) is route.handler.fn and "POST" in handler.http_methods
    ]
    if len(routed) != 1:
        raise RuntimeError(f"hot route for {route.handler.handler_name!r}: the app routes it {len(routed)} times")
    path, handler = routed[0]
    max_body = handler.resolve_request_max_body_size()
    if not max_body:
        raise RuntimeError(f"hot route {path}: its handler needs a request body limit")
    parameters = inspect.signature(route.answer).parameters
    needs = [name for name in parameters if name not in ("credential", "body", "headers", "scope")]
    answer = functools.partial(route.answer, **{name: getattr(wired, name) for name in needs})
    return _Bound(
        path,
        max_body,
        route.credential_header,
        answer,
        frozenset(route.also_read),
        "headers" in parameters,
        "scope" in parameters,
    )


def body_decoder(body_type: type[Body]) -> Callable[[bytes], Body | None]:
    """A strict decoder of a request body: the Struct, or None when the routed handler should say what is wrong."""
    decode = msgspec.json.Decoder(body_type).decode

    def decoded(body: bytes) -> Body | None:
        try:
            value = decode(body)
            # A tiny body with one or two keys: the stdlib check costs about a microsecond.
            return None if duplicate_key(body) is not None else value
        except (msgspec.MsgspecError, RecursionError):
            return None

    return decoded


class HotPaths:
    """The ASGI app in front of Litestar's own handler: answers plain hot requests, hands on the rest."""

    __slots__ = ("_app", "_next", "_routes")

    def __init__(self, app: Litestar, next_app: ASGIApp) -> None:
        self._app = app
        self._next = next_app
        self._routes: dict[str, _Bound] = {}

    @property
    def paths(self) -> list[str]:
        """The paths answered here (the request observer names their route in metrics and spans)."""
        return list(self._routes)

    @classmethod
    def install(cls, app: Litestar) -> HotPaths:
        """Put the hot paths in front of the app's handler; they answer nothing until bound."""
        front = cls(app, app.asgi_handler)
        app.asgi_handler = front
        return front

    def bind(self, routes: Sequence[HotRoute], wired: object) -> None:
        """Answer these routes with the objects of `wired` (each lifespan binds its own)."""
        self._routes = {bound.path: bound for bound in (_bind(self._app, route, wired) for route in routes)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self._next(scope, receive, send)
            return
        route = self._routes.get(scope["path"])
        if route is None or scope["method"] != "POST":
            await self._next(scope, receive, send)
            return
        credential = length = content_type = None
        also: dict[bytes, str] = {}
        twice = False
        for name, value in scope["headers"]:
            if name == route.credential_header and credential is None:
                credential = value
            elif name == b"content-length" and length is None:
                length = int(value) if value.isdigit() and len(value) < 10 else -1
            elif name == b"content-type" and content_type is None:
                content_type = value
            elif name in route.also_read:
                twice = twice or name in also
                also[name] = value.decode("latin-1")
        if (
            twice
            or credential is None
            or length is None
            or not 0 < length <= route.max_body
            or content_type is None
            or (content_type != _JSON_TYPE and not is_json_content_type(content_type))
        ):
            await self._next(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer, nothing done
            body += message.get("body", b"")
            if not message.get("more_body", False) or len(body) > route.max_body:
                break
        if len(body) != length:
            await self._next(scope, _replaying(body, receive), send)
            return
        extra: dict[str, Any] = {}
        if route.takes_headers:
            extra["headers"] = also
        if route.takes_scope:
            extra["scope"] = scope
        try:
            answer = await route.answer(credential.decode("latin-1"), body, **extra)
        except errors.DomainError as exc:
            request: Request[Any, Any, Any] = Request(scope, receive, send)
            await (
                problems.from_domain_error(exc)
                .to_response(request)
                .to_asgi_response(app=None, request=request)(scope, receive, send)
            )
            return
        except Exception as exc:
            request = Request(scope, receive, send)
            response = problems.unexpected(request, exc)
            await response.to_asgi_response(app=None, request=request)(scope, receive, send)
            return
        if answer is None:
            await self._next(scope, _replaying(body, receive), send)
            return
        payload = _encode(answer)
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 200,
            "headers": [_JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
        }
        await send(start)
        await send({"type": "http.response.body", "body": payload, "more_body": False})


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for the routed handler: the body already read, then whatever the client sends next."""
    replayed = False

    async def receive_again() -> ReceiveMessage:
        nonlocal replayed
        if not replayed:
            replayed = True
            message: HTTPRequestEvent = {"type": "http.request", "body": body, "more_body": False}
            return message
        return await receive()

    return receive_again

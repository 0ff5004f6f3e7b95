"""`POST /v1/verify` answered on plain ASGI, in front of Litestar's routing, for the common request.

A gate's scan is the request the service must answer at rush-hour rates, and Litestar's routing,
parameter extraction and response objects cost about as much CPU as the decision itself
(docs/performance.md). So the plain request — an `X-Api-Key`, a `Content-Length` within the
limit, a JSON body that decodes — is decided here by the same `answer_scan` the routed handler
calls, and its answer encoded from the same `VerifyResponse`. Everything else (signed requests,
unknown or disabled keys, bodies that are chunked, too large or do not decode) is handed on to
the routed handler unchanged, body included: its problem answers have one source. Problems that
arise during the decision (429, 503) are rendered by Litestar's problem-details response; an
unexpected error by the app's own 500 handler.

The OpenAPI document describes the routed handler; tests hold both to the same answers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request
from litestar.enums import ScopeType
from litestar.plugins.problem_details import ProblemDetailsException

from app import problems
from app.context import context_of
from app.domain.verification.controllers import MAX_BODY_BYTES, answer_scan
from app.domain.verification.schemas import VerifyRequest

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import ASGIApp, HTTPRequestEvent, HTTPResponseStartEvent, Receive, ReceiveMessage, Scope, Send

VERIFY_PATH = "/v1/verify"
_JSON_HEADERS = (b"content-type", b"application/json")
_decode_request = msgspec.json.Decoder(VerifyRequest).decode
_encode = msgspec.json.Encoder().encode


class VerifyHotPath:
    """The ASGI app in front of Litestar's own handler: answers plain verify requests, hands on the rest."""

    __slots__ = ("_app", "_next")

    def __init__(self, app: Litestar, next_app: ASGIApp) -> None:
        self._app = app
        self._next = next_app

    @classmethod
    def install(cls, app: Litestar) -> None:
        """Put the hot path in front of the app's handler (once, however often the lifespan runs)."""
        if not isinstance(app.asgi_handler, cls):
            app.asgi_handler = cls(app, app.asgi_handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"] != VERIFY_PATH or scope["method"] != "POST":
            await self._next(scope, receive, send)
            return
        started = time.perf_counter()
        api_key = length = None
        for name, value in scope["headers"]:
            if name == b"x-api-key" and api_key is None:
                api_key = value
            elif name == b"content-length" and length is None:
                length = int(value) if value.isdigit() else -1
        if api_key is None or length is None or not 0 < length <= MAX_BODY_BYTES:
            await self._next(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer, nothing decided
            body += message.get("body", b"")
            if not message.get("more_body", False) or len(body) > MAX_BODY_BYTES:
                break
        terminal = context_of(self._app.state).directory.authenticate(api_key.decode("latin-1"))
        credential = _credential_in(body) if terminal is not None and len(body) == length else None
        if terminal is None or credential is None:
            await self._next(scope, _replaying(body, receive), send)
            return
        try:
            answer = await answer_scan(context_of(self._app.state).verifier, terminal, credential, started)
        except ProblemDetailsException as exc:
            request: Request[Any, Any, Any] = Request(scope, receive, send)
            await exc.to_response(request).to_asgi_response(app=None, request=request)(scope, receive, send)
            return
        except Exception as exc:
            request = Request(scope, receive, send)
            response = problems.unexpected(request, exc)
            await response.to_asgi_response(app=None, request=request)(scope, receive, send)
            return
        payload = _encode(answer)
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 200,
            "headers": [_JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
        }
        await send(start)
        await send({"type": "http.response.body", "body": payload, "more_body": False})


def _credential_in(body: bytes) -> str | None:
    """The credential of a well-formed request body, or None (the routed handler explains what is wrong)."""
    try:
        return _decode_request(body).credential
    except msgspec.MsgspecError:
        return None


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

"""The ASGI app in front of everything, the hot paths included: request id, access line, route metrics, span.

It runs once per request, before app.http.hot_paths decides who answers, so a gate's scan answered
on plain ASGI is logged, counted and traced like any routed request. Its cost per request is a
few microseconds (docs/performance.md has the figures): no body is read, no header parsed but
`X-Request-Id` from a trusted proxy and, with tracing on, `traceparent`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from litestar.enums import ScopeType

from app.observability import logs, metrics
from app.observability.request_ids import REQUEST_ID, RequestIds

if TYPE_CHECKING:
    from collections.abc import Collection

    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    from app.observability.tracing import RequestTracer

# A request no route matched: its path is not a label (it can be anything a client sends, a card number).
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = b"x-request-id"


class RequestObserver:
    """Gives each HTTP request its id and, once answered, its access line, its metrics and its span."""

    __slots__ = ("_ids", "_next", "_own_paths", "_tracer")

    def __init__(
        self, next_app: ASGIApp, ids: RequestIds, own_paths: Collection[str], tracer: RequestTracer | None
    ) -> None:
        self._next = next_app
        self._ids = ids
        # Paths answered in front of the router (no `path_template` in their scope): their own template.
        self._own_paths = frozenset(own_paths)
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self._next(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._ids.of(scope)
        header = (_REQUEST_ID, request_id.encode())
        status = 500  # what the client gets if nothing was sent (the server answers 500)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        span = self._tracer.start(scope, request_id) if self._tracer is not None else None
        try:
            await self._next(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            route = scope.get("path_template") or (scope["path"] if scope["path"] in self._own_paths else UNMATCHED)
            metrics.count_request(method, route, status, seconds)
            logs.access_line(method, route, status, seconds, request_id)
            if span is not None:
                span.end(method, route, status)
            REQUEST_ID.reset(token)

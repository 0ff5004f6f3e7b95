"""U+0000 (NUL) in a request's text is refused with a 400, in the URL and in JSON bodies.

PostgreSQL's text types cannot hold NUL: a name, a filter or a username with one reached the
database and came back as a 500 (found by tests/integration/test_schemathesis.py), while SQLite
stored it. No field of this API has a use for it, so it is refused before any handler reads it,
and the two backends answer alike.
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from app.domain import errors

NUL = "\x00"


def contains_nul(value: Any) -> bool:
    """True if a decoded JSON value has a NUL in any string, key or value, at any depth."""
    if isinstance(value, str):
        return NUL in value
    if isinstance(value, dict):
        return any(NUL in key or contains_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(contains_nul(item) for item in value)
    return False


def refuse_nul_in_url(app: ASGIApp) -> ASGIApp:
    """Middleware: a 400 problem for a NUL in the path or the query string (`%00`), before routing reads them."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and (NUL in scope["path"] or b"%00" in scope.get("query_string", b"")):
            raise errors.Invalid("the URL must not contain U+0000 (NUL)")
        await app(scope, receive, send)

    return middleware

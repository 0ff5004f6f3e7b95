"""`GET /.well-known/jwks.json`: every issuer key, for verifiers online and offline."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.datastructures import CacheControlHeader

from app.context import context_of
from crypto.jwk import jwks


@get(
    "/.well-known/jwks.json",
    tags=["keys"],
    summary="Issuer public keys (JWKS)",
    cache_control=CacheControlHeader(max_age=300, public=True),
)
async def issuer_jwks(request: Request[Any, Any, Any]) -> dict[str, list[dict[str, str]]]:
    """Ed25519 OKP keys (RFC 8037) with `kid` and the `region` each signs for."""
    return jwks(context_of(request.app.state).directory.keys.verify_keys.values())

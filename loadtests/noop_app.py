"""The reference the verify benchmark compares against: a Litestar POST that does nothing.

It takes the same body as `/v1/verify` (a msgspec Struct with the credential text) and answers
a Struct of about the same size, so the difference between the two is the verify work itself:
terminal look-up, Ed25519, the Redis round trip and disclosure. Serve it like the service:

    uvicorn --factory loadtests.noop_app:create_app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Litestar, get, post
from litestar.params import JSONBody

# The same bound as crypto.credential.MAX_TEXT_LENGTH, without importing the service.
MAX_TEXT_LENGTH = 512


class NoopRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The shape of a verify request."""

    credential: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]


class NoopResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The shape of an accepted verify answer, without claims."""

    result: str
    verification_id: str
    purpose: str | None = None


@post("/noop", status_code=200, request_max_body_size=2048)
async def noop(data: JSONBody[NoopRequest]) -> NoopResponse:
    """Decode the body, answer a constant."""
    return NoopResponse(result="accepted", verification_id="vf_noop", purpose="transit")


@get("/health")
async def health() -> dict[str, str]:
    """Readiness probe for the benchmark."""
    return {"status": "ok"}


def create_app() -> Litestar:
    """The app factory (uvicorn --factory)."""
    return Litestar(route_handlers=[noop, health], openapi_config=None)

"""`POST /v1/verify`: the hot path. No database, no DI beyond the body, one store round trip."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, post
from litestar.params import HeaderParameter, JSONBody

from app import problems
from app.context import context_of
from app.dependencies import TERMINAL_SECURITY
from app.domain.verification.schemas import VerifyRequest, VerifyResponse
from app.stores.status_mirror import StoreUnavailable

MAX_BODY_BYTES = 2048


@post(
    "/v1/verify",
    status_code=200,
    security=TERMINAL_SECURITY,
    request_max_body_size=MAX_BODY_BYTES,
    tags=["verification"],
    summary="Verify a scanned credential",
    responses=problems.problem_responses(401, 413, 503),
)
async def verify(
    request: Request[Any, Any, Any],
    data: JSONBody[VerifyRequest],
    api_key: Annotated[str | None, HeaderParameter(name="X-Api-Key", required=False)] = None,
) -> VerifyResponse:
    """Accept or reject a scanned credential, once.

    A rejection is a normal answer (200) with a stable reason code; 4xx answers mean the
    request itself was wrong (bad body, unknown terminal). 503 means the status store is
    unreachable: nothing was accepted.
    """
    context = context_of(request.app.state)
    terminal = context.directory.authenticate(api_key)
    if terminal is None:
        raise problems.unauthorized("unknown, disabled or malformed terminal API key (X-Api-Key)")
    try:
        outcome = await context.verifier.verify(terminal, data.credential)
    except StoreUnavailable:
        raise problems.unavailable("card status store is unreachable; the credential was not accepted") from None
    if outcome.accepted:
        return VerifyResponse(
            result="accepted",
            verification_id=outcome.verification_id,
            purpose=outcome.purpose,
            claims=outcome.claims,
        )
    return VerifyResponse(
        result="rejected",
        verification_id=outcome.verification_id,
        reason=outcome.reason.value if outcome.reason else None,
        purpose=outcome.purpose,
    )

"""Running a money-moving request once per Idempotency-Key, for any controller."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.params import HeaderParameter
from litestar.plugins.problem_details import ProblemDetailsException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import IdempotencyRecord
from app.domain import errors
from app.domain.ledger.idempotency import (
    MAX_KEY_LENGTH,
    Claim,
    ClaimLost,
    Replay,
    check_key,
    claim,
    complete,
    release,
    request_hash,
)
from app.http import problems

T = TypeVar("T", bound=msgspec.Struct)

# Documented as required (it is); read as optional, so that a missing key gets check_key's own 400,
# which says what a usable key is, rather than Litestar's generic one.
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=True,
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        description=(
            f"1 to {MAX_KEY_LENGTH} printable ASCII characters, new for each operation. The same key and body "
            "replay the first answer (with `Idempotent-Replayed: true`); the same key with another body is a 422."
        ),
    ),
]

# Answers that say "not now" rather than "no": the key is released so the retry runs the request.
_TRANSIENT = {"verification_not_recorded", "unavailable"}


def _problem_body(exc: ProblemDetailsException) -> bytes:
    extra = exc.extra if isinstance(exc.extra, dict) else {}
    return msgspec.json.encode(
        {"type": exc.type_, "title": exc.title, "status": exc.status_code, "detail": exc.detail, **extra}
    )


def _replayed(replay: Replay, answer_type: type[T]) -> Response[T]:
    if replay.status_code >= 400:
        stored = msgspec.json.decode(replay.body)
        raise problems.problem(
            replay.status_code, str(stored.pop("code", "error")), str(stored.pop("detail", "")),
            **{k: v for k, v in stored.items() if k not in ("type", "title", "status")}, replayed=True,
        )  # fmt: skip
    answer = msgspec.json.decode(replay.body, type=answer_type)
    return Response(answer, status_code=replay.status_code, headers={"Idempotent-Replayed": "true"})


async def _answer_of_the_takeover(
    sessions: async_sessionmaker[AsyncSession], claimed: Claim, answer_type: type[T]
) -> Response[T]:
    """This attempt lost its claim to a retry: give the retry's answer if it has one, else 409 in progress."""
    async with sessions() as session:
        record = await session.get(IdempotencyRecord, (claimed.caller, claimed.key))
        if record is not None and record.status_code is not None and record.response_body is not None:
            return _replayed(Replay(record.status_code, record.response_body), answer_type)
    raise errors.Conflict("a request with this Idempotency-Key is in progress; retry shortly")


async def run_once(
    sessions: async_sessionmaker[AsyncSession],
    request: Request[Any, Any, Any],
    caller: str,
    key: str | None,
    answer_type: type[T],
    work: Callable[[AsyncSession], Awaitable[T]],
) -> Response[T]:
    """Do work once per Idempotency-Key; its answer is stored in work's own transaction."""
    fingerprint = request_hash(request.method, request.url.path, await request.body())
    claimed = await claim(sessions, caller, check_key(key), fingerprint)
    if isinstance(claimed, Replay):
        return _replayed(claimed, answer_type)
    try:
        async with sessions() as session:
            answer = await work(session)
            # Fenced: if a retry took the claim over meanwhile, this raises and the work rolls back.
            await complete(session, claimed, 201, msgspec.json.encode(answer))
            await session.commit()
    except ClaimLost:
        return await _answer_of_the_takeover(sessions, claimed, answer_type)
    except errors.DomainError as exc:
        if exc.code in _TRANSIENT:
            await release(sessions, claimed)
        else:
            refusal = problems.from_domain_error(exc)
            try:
                async with sessions() as session:
                    await complete(session, claimed, refusal.status_code, _problem_body(refusal))
                    await session.commit()
            except ClaimLost:
                # E.g. "already charged" because the retry that took the claim over charged it.
                return await _answer_of_the_takeover(sessions, claimed, answer_type)
        raise
    except BaseException:
        await release(sessions, claimed)
        raise
    return Response(answer, status_code=201)

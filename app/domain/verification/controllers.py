"""`POST /v1/verify` (the hot path: no database, one store round trip) and `POST /v1/verify/batch`."""

from __future__ import annotations

import time
from typing import TypeVar

from litestar import post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain import errors
from app.domain.verification.directory import TerminalEntry
from app.domain.verification.schemas import (
    BatchItemResult,
    BatchVerifyRequest,
    BatchVerifyResponse,
    VerifyRequest,
    VerifyResponse,
)
from app.domain.verification.service import MAX_BATCH, BatchScan, CredentialVerifier, Outcome, RateLimited
from app.http import problems
from app.http.auth import TERMINAL_SECURITY, Callers
from app.http.hot_paths import HotRoute, body_decoder
from app.observability import metrics
from app.stores.status_mirror import StoreUnavailable

MAX_BODY_BYTES = 2048
MAX_BATCH_BODY_BYTES = MAX_BATCH * 700

_UNAVAILABLE = "card status store is unreachable; the credential was not accepted"
_OUTCOME_UNKNOWN = (
    "card status store did not answer in time: the credential may have been used up. This terminal gets "
    "the first answer if it sends the same credential again within its retry window ({window} s); "
    "otherwise ask for a fresh code"
)


def _store_unavailable(exc: StoreUnavailable, retry_window: int) -> Exception:
    """503: "not accepted" when nothing reached the store, "outcome unknown" when the scan may have run."""
    if not exc.outcome_unknown:
        metrics.REFUSED_UNAVAILABLE.inc()
        return errors.Unavailable(_UNAVAILABLE)
    metrics.REFUSED_OUTCOME_UNKNOWN.inc()
    return errors.Unavailable(_OUTCOME_UNKNOWN.format(window=retry_window), code="outcome_unknown")


def _rate_limited(exc: RateLimited) -> Exception:
    return errors.Throttled(
        "this terminal is over its verification rate; nothing was consumed",
        retry_after=max(1, -(-exc.retry_after_ms // 1000)), retry_after_ms=exc.retry_after_ms,
    )  # fmt: skip


Answer = TypeVar("Answer", VerifyResponse, BatchItemResult)


def _answer(outcome: Outcome, answer_type: type[Answer]) -> Answer:
    """The outcome on the wire (a single verify answer or a batch item: the same fields)."""
    return answer_type(
        result="accepted" if outcome.accepted else "rejected",
        verification_id=outcome.verification_id,
        reason=outcome.reason.value if outcome.reason else None,
        purpose=outcome.purpose,
        claims=outcome.claims if outcome.accepted else None,
        first_used_at=outcome.first_used_at,
        repeated=outcome.repeated,
    )


@post(
    "/v1/verify",
    status_code=200,
    security=TERMINAL_SECURITY,
    request_max_body_size=MAX_BODY_BYTES,
    tags=["verification"],
    summary="Verify a scanned credential",
    responses=problems.problem_responses(401, 413, 429, 503),
)
async def verify(
    verifier: NamedDependency[CredentialVerifier],
    terminal: NamedDependency[TerminalEntry],
    data: JSONBody[VerifyRequest],
) -> VerifyResponse:
    """Accept or reject a scanned credential, once.

    A rejection is a normal answer (200) with a stable reason code; 4xx answers mean the
    request itself was wrong (bad body, unknown terminal). The terminal that got an answer
    gets the same one (same `verification_id`, `repeated: true`) if it sends the same
    credential again within a few seconds, e.g. after a lost reply; any other terminal gets
    `replayed`. 429 means the terminal is over its rate and nothing was consumed; 503 that the
    status store is unreachable: code `unavailable` when nothing reached it (nothing was accepted),
    `outcome_unknown` when it answered too late (the credential may have been used up; sending the
    same credential again within the retry window gets the first answer).
    """
    return await answer_scan(verifier, terminal, data.credential, time.perf_counter())


async def answer_scan(
    verifier: CredentialVerifier, terminal: TerminalEntry, credential: str, started: float
) -> VerifyResponse:
    """A terminal's scan decided and counted: the answer, or the problem to send (429, 503).

    Shared by the routed handler above (signed requests, and whatever the hot path hands on)
    and the hot path (`HOT_VERIFY`), so both give the same answers and metrics.
    """
    try:
        outcome = await verifier.verify(terminal, credential)
    except RateLimited as exc:
        metrics.REFUSED_RATE_LIMITED.inc()
        raise _rate_limited(exc) from None
    except StoreUnavailable as exc:
        raise _store_unavailable(exc, verifier.retry_window) from None
    metrics.count_result(outcome.reason.value if outcome.reason else "accepted")
    metrics.VERIFY_SECONDS.observe(time.perf_counter() - started)
    return _answer(outcome, VerifyResponse)


_verify_request = body_decoder(VerifyRequest)


async def _hot_verify(
    credential: str, body: bytes, callers: Callers, verifier: CredentialVerifier
) -> VerifyResponse | None:
    started = time.perf_counter()
    terminal = callers.terminal_by_key(credential)
    data = _verify_request(body) if terminal is not None else None
    if terminal is None or data is None:
        return None
    return await answer_scan(verifier, terminal, data.credential, started)


# A plain scan (API key, a body that decodes) served in front of the router; see app.http.hot_paths.
HOT_VERIFY = HotRoute(verify, b"x-api-key", _hot_verify)


@post(
    "/v1/verify/batch",
    status_code=200,
    security=TERMINAL_SECURITY,
    request_max_body_size=MAX_BATCH_BODY_BYTES,
    tags=["verification"],
    summary="Upload scans a gate made while offline",
    responses=problems.problem_responses(401, 413, 503),
)
async def verify_batch(
    verifier: NamedDependency[CredentialVerifier],
    terminal: NamedDependency[TerminalEntry],
    session: NamedDependency[AsyncSession],
    data: JSONBody[BatchVerifyRequest],
) -> BatchVerifyResponse:
    """Decide each queued scan at its scan time, in order; report double use across gates.

    Each item gets its own answer, as `/v1/verify` would have given it at `scanned_at`, except
    that a credential used before (online, or in another gate's upload) is `replayed` with the
    time of its first use: the gate let a copy through and the office should know. Uploading
    the same batch again gives the same answers and verification ids. Items over the upload
    budget come back as `rate_limited` with nothing consumed: send those again later.
    """
    scans = [BatchScan(item.credential, int(item.scanned_at.timestamp() * 1000)) for item in data.scans]
    try:
        outcomes = await verifier.verify_batch(session, terminal, scans)
    except StoreUnavailable:
        raise errors.Unavailable(
            "card status store is unreachable or answered too late; upload the same batch again: its answers "
            "and verification ids do not change"
        ) from None
    results = []
    for outcome in outcomes:
        if isinstance(outcome, RateLimited):
            results.append(BatchItemResult(result="rate_limited", retry_after_ms=outcome.retry_after_ms))
            continue
        results.append(_answer(outcome, BatchItemResult))
    double_uses = sum(1 for item in results if item.reason == "replayed")
    return BatchVerifyResponse(results=results, double_uses=double_uses)

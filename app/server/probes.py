"""Liveness and readiness probes for load balancers and orchestrators, and the Prometheus scrape.

`/health` only says the process answers: a liveness probe that checked Redis would have every
worker killed and restarted during a Redis outage, which helps nothing. `/ready` says whether
this worker can serve: the database, the status store, the issuer keys and the terminal directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.enums import MediaType
from litestar.openapi import ResponseSpec
from sqlalchemy import func, select, text

from app.db.models import MirrorChange
from app.http import problems
from app.observability import metrics
from app.server.context import STATE_KEY, ServiceContext, context_of

logger = logging.getLogger(__name__)

# Each check gets this long; they run concurrently, so /ready answers within about this.
CHECK_TIMEOUT = 1.0
CHECKS = ("database", "status_store", "issuer_keys", "directory")


class Liveness(msgspec.Struct, kw_only=True):
    """The process answers."""

    status: str


class Readiness(msgspec.Struct, kw_only=True):
    """Every dependency answered; `checked` names them."""

    status: str
    store: str
    checked: list[str]


class NotReadyProblem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem of a worker that cannot serve yet; `missing` names the failed checks."""

    status: int
    type: str
    title: str
    detail: str
    code: str
    missing: list[str]
    request_id: str | None = None


@get("/health", tags=["service"], summary="Liveness: the process answers")
async def health() -> Liveness:
    """Always `ok` while the process answers; checks no dependency (use /ready for that)."""
    return Liveness(status="ok")


async def _database(context: ServiceContext) -> bool:
    async with context.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return True


async def _status_store(context: ServiceContext) -> bool:
    await context.mirror.ping()
    return True


async def _issuer_keys(context: ServiceContext) -> bool:
    return bool(context.directory.keys.signing_keys)


# Probed on every call; the fourth check, "directory", is whether the lifespan published the context,
# which it does only after the directory's first load succeeded (terminals and issuer keys).
_PROBES: dict[str, Callable[[ServiceContext], Awaitable[bool]]] = {
    "database": _database,
    "status_store": _status_store,
    "issuer_keys": _issuer_keys,
}


async def _passes(name: str, context: ServiceContext) -> bool:
    """Whether one check passes within CHECK_TIMEOUT; a failure is logged, never raised."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await _PROBES[name](context)
    except TimeoutError:
        logger.warning("readiness check %s did not answer within %g s", name, CHECK_TIMEOUT)
    except Exception as exc:
        logger.warning("readiness check %s failed: %r", name, exc)
    return False


async def missing_dependencies(context: ServiceContext | None) -> list[str]:
    """The checks that fail now, in CHECKS order; without a loaded context (still starting) all of them."""
    if context is None:
        return list(CHECKS)
    results = dict(zip(_PROBES, await asyncio.gather(*(_passes(name, context) for name in _PROBES)), strict=True))
    return [name for name in CHECKS if not results.get(name, True)]


@get(
    "/ready",
    tags=["service"],
    summary="Readiness: database, status store, issuer keys and terminal directory",
    responses={
        503: ResponseSpec(
            data_container=NotReadyProblem,
            media_type="application/problem+json",
            description="Not ready: `missing` lists the failed checks; route no traffic here",
            generate_examples=False,
        )
    },
)
async def ready(request: Request[Any, Any, Any]) -> Readiness:
    """200 when every dependency answers within a second; else a 503 `not_ready` problem listing what is missing."""
    context: ServiceContext | None = request.app.state.get(STATE_KEY)
    missing = await missing_dependencies(context)
    if missing or context is None:
        exc = problems.problem(503, "not_ready", f"not ready: {', '.join(missing)}", missing=missing)
        exc.headers = {"Retry-After": "1"}
        raise exc
    return Readiness(status="ready", store="redis" if context.settings.redis_url else "memory", checked=list(CHECKS))


# A scrape waits this long for each state it samples (the stream's backlog, the outbox), then answers.
SAMPLE_TIMEOUT = 1.0


async def _sample_backlogs(context: ServiceContext) -> None:
    """Set the gauges of shared state that only a query can tell: events waiting, outbox changes waiting."""
    try:
        async with asyncio.timeout(SAMPLE_TIMEOUT):
            backlog = await context.events.backlog()
        metrics.EVENT_BACKLOG.set(backlog.length)
        metrics.EVENT_PENDING.set(backlog.pending)
    except Exception as exc:  # a scrape during an outage answers with what it has
        logger.warning("event stream backlog not sampled: %r", exc)
    try:
        async with asyncio.timeout(SAMPLE_TIMEOUT), context.sessions() as session:
            pending = await session.scalar(select(func.count()).select_from(MirrorChange))
        metrics.OUTBOX_PENDING.set(pending or 0)
    except Exception as exc:
        logger.warning("mirror outbox not sampled: %r", exc)


@get("/metrics", tags=["service"], summary="Prometheus metrics", media_type=MediaType.TEXT, include_in_schema=True)
async def prometheus_metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Routes, verification, issuing, the event drain and the status mirror, in the Prometheus text format."""
    if STATE_KEY in request.app.state:
        await _sample_backlogs(context_of(request.app.state))
    body, content_type = metrics.exposition()
    # Litestar appends the charset to every text/* type itself: the exposition's own would come twice.
    return Response(body, media_type=content_type.replace("; charset=utf-8", ""))

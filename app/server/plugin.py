"""The one wiring plugin: routes, dependencies, error handling, OpenAPI, lifespan and CLI commands."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from click import Group
from litestar import Litestar, Request, Response, get
from litestar.config.app import AppConfig
from litestar.enums import MediaType
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, OpenAPI, SecurityScheme
from litestar.plugins import CLIPlugin, InitPlugin
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.routes import HTTPRoute
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.db.models import MirrorChange
from app.domain import errors
from app.domain.audit.controllers import AuditController
from app.domain.cards.controllers import CardController
from app.domain.cards.services import mirror_all_statuses
from app.domain.catalog.controllers import CatalogController
from app.domain.entitlements.controllers import EntitlementController
from app.domain.holders.controllers import (
    HOT_ISSUE,
    HolderAuthController,
    HolderCardController,
    HolderCredentialController,
)
from app.domain.imports.controllers import UPLOAD_DIR, ImportController
from app.domain.imports.services import remove_stale_uploads
from app.domain.issuers.controllers import issuer_jwks, offline_kit, trust_list
from app.domain.ledger.controllers import HolderMoneyController, OperatorMoneyController, TerminalMoneyController
from app.domain.lending.controllers import HolderLoansController, LendingController
from app.domain.operators.controllers import OperatorSessionController
from app.domain.regions.controllers import RegionController
from app.domain.verification.controllers import HOT_VERIFY, verify, verify_batch
from app.domain.verifiers.controllers import VerifierController
from app.domain.web.docs_page import docs_render_plugins
from app.domain.web.pages import web_routers
from app.http import problems
from app.http.auth import DEPENDENCIES
from app.http.hot_paths import HotPaths
from app.http.json_bodies import StrictJsonRequest
from app.http.nul_text import refuse_nul_in_url
from app.http.schema import WireModelSchemaPlugin
from app.observability import logs, metrics
from app.observability.request_ids import RequestIds
from app.observability.tracing import RequestTracer, tracer_provider
from app.server.context import STATE_KEY, ServiceContext, context_of
from app.server.health import health, ready
from app.server.request_observer import RequestObserver
from app.settings import PROJECT_ROOT, Settings
from app.stores.status_mirror import StoreUnavailable

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
LOCK_DIR = PROJECT_ROOT / "var"
STALE_UPLOAD_AGE = timedelta(hours=6)


class SingleWorkerError(RuntimeError):
    """The in-process nonce store is in use by another worker."""


def memory_store_lock_path(database_url: str) -> Path:
    """One lock per database: the workers of one deployment share it, test runs do not."""
    return LOCK_DIR / f"memory-store-{hashlib.sha256(database_url.encode()).hexdigest()[:16]}.lock"


def _lock_single_worker(path: Path) -> IO[str]:
    """Hold an exclusive lock for the life of the process: a second worker cannot start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SingleWorkerError(
            "another worker already uses the in-process nonce store; without REDIS_URL the service "
            "runs one worker only (set REDIS_URL to run more)"
        ) from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


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


def drop_no_content_bodies(document: dict[str, Any]) -> None:
    """A 204 answer has no body (RFC 9110 §15.3.5); Litestar documents one of `null` for `Response[None]`."""
    for item in document.get("paths", {}).values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).get("204", {}).pop("content", None)


@dataclass
class ContractDocument(OpenAPI):
    """The OpenAPI document, its error answers documented as problems (app.http.problems), its 204s empty."""

    def to_schema(self) -> dict[str, Any]:
        """The document as JSON data, every 4xx/5xx answer an `application/problem+json` ProblemBody."""
        document = super().to_schema()
        problems.document_problem_answers(document)
        drop_no_content_bodies(document)
        return document


@dataclass
class ContractOpenAPIConfig(OpenAPIConfig):
    """Litestar's OpenAPI configuration, building a `ContractDocument` (served and exported alike)."""

    def to_openapi_schema(self) -> OpenAPI:
        """The document Litestar fills with paths and components, as a ContractDocument."""
        base = super().to_openapi_schema()
        return ContractDocument(**{field.name: getattr(base, field.name) for field in fields(base)})


class AllowEveryMethod:
    """An app `before_request` hook: OPTIONS answers with every method of the path.

    Litestar 2 makes a path's OPTIONS handler when it registers the path's first handler and keeps
    it as handlers are added, so its `Allow` named only that first method (litestar#4169, fixed in
    Litestar 3). The answer is otherwise the one Litestar gives: 204 with `Allow`.
    """

    def __init__(self) -> None:
        self._allow: dict[str, str] | None = None

    async def __call__(self, request: Request[Any, Any, Any]) -> Response[None] | None:
        """For Litestar's own OPTIONS handler, its answer with the full `Allow`; otherwise go on."""
        if request.method != "OPTIONS" or request.route_handler.handler_name != "options_handler":
            return None
        if self._allow is None:
            self._allow = {
                route.path_format: ", ".join(sorted(route.methods))
                for route in request.app.routes
                if isinstance(route, HTTPRoute)
            }
        allow = self._allow.get(request.scope["path_template"])
        if allow is None:
            return None
        return Response(None, status_code=204, headers={"Allow": allow}, media_type=MediaType.TEXT)


def _integrity_error(exc: IntegrityError) -> ProblemDetailsException:
    return problems.from_domain_error(errors.Conflict("the request conflicts with existing data (a duplicate?)"))


def _store_unavailable(exc: StoreUnavailable) -> ProblemDetailsException:
    return problems.from_domain_error(errors.Unavailable("card status store is unreachable; nothing was changed there"))


class EcardPlugin(InitPlugin, CLIPlugin):
    """Everything the eCard app is made of."""

    def __init__(self, settings: Settings, traces: TracerProvider | None = None) -> None:
        self.settings = settings
        # Spans go to the given provider (tests), else to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
        provider = traces or tracer_provider(settings)
        self.tracer = RequestTracer(provider) if provider is not None else None

    def on_cli_init(self, cli: Group) -> None:
        """Add `litestar ecard …` commands."""
        from app.server.cli import ecard_group

        cli.add_command(ecard_group)

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        """Build the context, load caches, and tear down on exit."""
        lock = None
        if not self.settings.redis_url:
            if self.settings.production:
                raise RuntimeError("production mode needs REDIS_URL: the in-process nonce store serves one worker only")
            if self.settings.workers > 1:
                raise SingleWorkerError("without REDIS_URL the service runs one worker only (WEB_CONCURRENCY=1)")
            lock = _lock_single_worker(memory_store_lock_path(self.settings.database_url))
        context = ServiceContext.build(self.settings)
        try:
            removed = await asyncio.to_thread(remove_stale_uploads, UPLOAD_DIR, STALE_UPLOAD_AGE)
            if removed:
                logger.warning("removed %d import upload(s) left behind by a crashed worker", removed)
            await context.start()
            if not self.settings.redis_url:
                async with context.sessions() as session:
                    await mirror_all_statuses(session, context.mirror, context.pii)
            app.state[STATE_KEY] = context
            self.install_front(app)
            # What exists now (app, routes, caches, tables) lives as long as the process: frozen, the
            # collector's full passes skip it (they took ~50 ms, several a minute under load).
            gc.collect()
            gc.freeze()
            yield
        finally:
            await context.close()
            if lock is not None:
                lock.close()

    def install_front(self, app: Litestar) -> None:
        """Hot paths in front of the router, the observer in front of both (once, however often the lifespan runs)."""
        if isinstance(app.asgi_handler, RequestObserver):
            return
        routes = [HOT_VERIFY, HOT_ISSUE]
        HotPaths.install(app, routes)
        ids = RequestIds(self.settings.trusted_proxies)
        app.asgi_handler = RequestObserver(app.asgi_handler, ids, [route.path for route in routes], self.tracer)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Register routes, dependencies, error handling and the OpenAPI document."""
        app_config.route_handlers.extend(
            [
                verify,
                verify_batch,
                issuer_jwks,
                offline_kit,
                trust_list,
                health,
                ready,
                prometheus_metrics,
                HolderAuthController,
                HolderCardController,
                HolderCredentialController,
                OperatorSessionController,
                RegionController,
                CardController,
                EntitlementController,
                ImportController,
                VerifierController,
                AuditController,
                TerminalMoneyController,
                OperatorMoneyController,
                HolderMoneyController,
                LendingController,
                HolderLoansController,
                CatalogController,
                *web_routers(),
            ]
        )
        app_config.dependencies.update(DEPENDENCIES)
        # Every JSON `data:` body is read through it: media type, duplicate keys, nesting (app.http.json_bodies).
        app_config.request_class = StrictJsonRequest
        app_config.middleware.append(refuse_nul_in_url)
        app_config.lifespan.append(self.lifespan)
        app_config.plugins.append(
            ProblemDetailsPlugin(
                ProblemDetailsConfig(
                    enable_for_all_http_exceptions=True,
                    exception_to_problem_detail_map={
                        HTTPException: problems.from_http_exception,
                        errors.DomainError: problems.from_domain_error,
                        IntegrityError: _integrity_error,
                        StoreUnavailable: _store_unavailable,
                    },
                )
            )
        )
        app_config.exception_handlers[Exception] = problems.unexpected
        app_config.plugins.append(logs.logging_plugin(self.settings))
        # Consulted before Litestar's own msgspec schema plugin, which comes after this plugin.
        app_config.plugins.insert(app_config.plugins.index(self) + 1, WireModelSchemaPlugin())
        app_config.before_request = AllowEveryMethod()
        app_config.openapi_config = ContractOpenAPIConfig(
            title="eCard API",
            version=API_VERSION,
            description=(
                "Electronic social security card: activation, dynamic QR credentials (CWT/COSE, Base45) "
                "and their verification. Errors are RFC 9457 problem details."
            ),
            use_handler_docstrings=True,
            render_plugins=docs_render_plugins(),
            components=Components(
                security_schemes={
                    "holderToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
                    "operatorToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
                    "terminalApiKey": SecurityScheme(type="apiKey", name="X-Api-Key", security_scheme_in="header"),
                    "terminalSignature": SecurityScheme(
                        type="apiKey",
                        name="X-Signature",
                        security_scheme_in="header",
                        description=(
                            "For terminals that registered an Ed25519 key: X-Terminal-Id, X-Signature-Timestamp "
                            "(unix seconds, within 30 s of the server) and X-Signature, the unpadded base64url "
                            "Ed25519 signature of 'ecard-terminal-v1\\n<METHOD>\\n<path>\\n<timestamp>\\n' "
                            "followed by the raw request body."
                        ),
                    ),
                }
            ),
        )
        return app_config

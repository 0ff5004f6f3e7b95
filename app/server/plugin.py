"""The one wiring plugin: routes, dependencies, error handling, OpenAPI, lifespan and CLI commands."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from click import Group
from litestar import Litestar, Request, Response
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
from sqlalchemy.exc import IntegrityError

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
from app.http import problems
from app.http.hot_paths import HotPaths
from app.http.json_bodies import StrictJsonRequest
from app.http.nul_text import refuse_nul_in_url
from app.http.schema import WireModelSchemaPlugin
from app.observability import logs
from app.observability.request_ids import RequestIds
from app.observability.tracing import RequestTracer, tracer_provider
from app.server.context import ServiceContext, close_request_sessions, dependencies
from app.server.docs_page import docs_render_plugins
from app.server.probes import health, prometheus_metrics, ready
from app.server.request_observer import RequestObserver
from app.server.single_worker import SingleWorkerError, lock_single_worker, memory_store_lock_path
from app.server.web_pages import web_routers
from app.settings import Settings
from app.stores.status_mirror import StoreUnavailable

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
STALE_UPLOAD_AGE = timedelta(hours=6)


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
        self._hot_paths: HotPaths | None = None

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
            lock = lock_single_worker(memory_store_lock_path(self.settings.database_url))
        context = ServiceContext.build(self.settings)
        try:
            removed = await asyncio.to_thread(remove_stale_uploads, UPLOAD_DIR, STALE_UPLOAD_AGE)
            if removed:
                logger.warning("removed %d import upload(s) left behind by a crashed worker", removed)
            await context.start()
            if not self.settings.redis_url:
                async with context.sessions() as session:
                    await mirror_all_statuses(session, context.mirror, context.pii)
            context.install(app.state)
            self.install_front(app, context)
            # What exists now (app, routes, caches, tables) lives as long as the process: frozen, the
            # collector's full passes skip it (they took ~50 ms, several a minute under load).
            gc.collect()
            gc.freeze()
            yield
        finally:
            await context.close()
            if lock is not None:
                lock.close()

    def install_front(self, app: Litestar, context: ServiceContext) -> None:
        """Hot paths in front of the router, the observer in front of both; each lifespan binds its context."""
        first = self._hot_paths is None
        if self._hot_paths is None:
            self._hot_paths = HotPaths.install(app)
        self._hot_paths.bind([HOT_VERIFY, HOT_ISSUE], context)
        if first:
            ids = RequestIds(self.settings.trusted_proxies)
            app.asgi_handler = RequestObserver(app.asgi_handler, ids, self._hot_paths.paths, self.tracer)

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
        app_config.dependencies.update(dependencies())
        # Every JSON `data:` body is read through it: media type, duplicate keys, nesting (app.http.json_bodies).
        app_config.request_class = StrictJsonRequest
        app_config.middleware.append(refuse_nul_in_url)
        app_config.middleware.append(close_request_sessions)
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
                    "holderToken": SecurityScheme(
                        type="http",
                        scheme="DPoP",
                        bearer_format="JWT",
                        description=(
                            "A holder's access token, bound to the device key it was activated with (`cnf.jkt`): "
                            "sent as 'Authorization: DPoP <token>' beside a DPoP proof (RFC 9449). "
                            "'Bearer' is refused."
                        ),
                    ),
                    problems.DPOP_PROOF_SCHEME: SecurityScheme(
                        type="apiKey",
                        name="DPoP",
                        security_scheme_in="header",
                        description=(
                            "A DPoP proof (RFC 9449), new for each request: a compact JWS with header "
                            '{"typ": "dpop+jwt", "alg": "EdDSA", "jwk": <the device\'s Ed25519 public key>} and '
                            "claims jti (unique, at most 64 characters), htm (the method), htu (the request's URI "
                            "without query), iat (unix seconds, within the last 60 s) and, beside an access token, "
                            "ath (base64url SHA-256 of the token). A refusal is 401 with "
                            '\'WWW-Authenticate: DPoP algs="EdDSA", error="invalid_dpop_proof"\' and the '
                            "problem's `reason`."
                        ),
                    ),
                    "operatorToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
                    "terminalApiKey": SecurityScheme(type="apiKey", name="X-Api-Key", security_scheme_in="header"),
                    "terminalSignature": SecurityScheme(
                        type="apiKey",
                        name="X-Signature",
                        security_scheme_in="header",
                        description=(
                            "For terminals that registered a key: X-Terminal-Id, X-Signature-Timestamp "
                            "(unix seconds, within 30 s of the server) and X-Signature, the unpadded base64url "
                            "signature of 'ecard-terminal-v1\\n<METHOD>\\n<path>\\n<timestamp>\\n' "
                            "followed by the raw request body: Ed25519, or SM2 with SM3 (r ‖ s, 64 bytes, "
                            "default signer ID) for an SM2 key."
                        ),
                    ),
                }
            ),
        )
        return app_config

"""Money endpoints: terminals charge fares and settle bills, operators pay subsidies; every one idempotent."""

from __future__ import annotations

import secrets
import uuid
from datetime import date, datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.clock import as_utc, utcnow
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.ledger.schemas import (
    FareOut,
    FareRequest,
    MovementOut,
    ReconciliationOut,
    SettlementOut,
    SettlementRequest,
    StatementOut,
    SubsidyBatch,
    SubsidyBatchOut,
)
from app.domain.ledger.services import (
    MedicalCoverage,
    accepted_verification,
    card_statement,
    charge_fare,
    daily_reconciliation,
    pay_subsidies,
    settle_medical_bill,
)
from app.domain.operators.services import Role, require_region
from app.domain.verification.directory import TerminalEntry
from app.domain.verifiers.services import get_organisation
from app.http.auth import HOLDER_SECURITY, OPERATOR_SECURITY, AuthenticatedHolder, requires
from app.http.idempotent import IdempotencyKey, run_once
from app.http.problems import problem_responses
from app.security.tokens import OperatorSession
from crypto.credential import Purpose


class TerminalMoneyController(Controller):
    """Fares and medical bills, bound to verifications the terminal's organisation made."""

    path = "/v1/terminal"
    tags = ["money"]
    security = [{"terminalApiKey": []}, {"terminalSignature": []}]
    request_max_body_size = 2048

    @post(
        "/fares",
        status_code=201,
        summary="Charge a transit fare",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def fare(
        self,
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        terminal: NamedDependency[TerminalEntry],
        request: Request[Any, Any, Any],
        data: JSONBody[FareRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[FareOut]:
        """The card pays the transit operator, once per verification (409 for a second fare on it)."""
        if Purpose.TRANSIT not in terminal.purposes:
            raise errors.Forbidden("this terminal does not take transit fares")

        async def work(session: AsyncSession) -> FareOut:
            verified = await accepted_verification(
                session, data.verification_id, terminal.organisation_id, Purpose.TRANSIT.label
            )
            entry = None
            if data.entry_verification_id is not None:
                entry = await accepted_verification(
                    session, data.entry_verification_id, terminal.organisation_id, Purpose.TRANSIT.label
                )
            transaction = await charge_fare(session, verified, data.amount_fen, {"route": data.route}, entry)
            return FareOut(transaction.id, data.verification_id, data.amount_fen, transaction.created_at)

        return await run_once(sessions, request, f"terminal:{terminal.key}", idempotency_key, FareOut, work)

    @post(
        "/medical-settlements",
        status_code=201,
        summary="Settle a medical bill",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def settlement(
        self,
        coverage: NamedDependency[MedicalCoverage],
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        terminal: NamedDependency[TerminalEntry],
        request: Request[Any, Any, Any],
        data: JSONBody[SettlementRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[SettlementOut]:
        """Split the bill: the card's insurance fund pays its share, the holder the rest.

        The share depends on the holder's scheme and is lower for a bill out of the card's region.

        Needs an accepted `medical` verification of this hospital: medical credentials are only
        issued after the holder's PIN step-up.
        """
        if Purpose.MEDICAL not in terminal.purposes:
            raise errors.Forbidden("this terminal does not settle medical bills")

        async def work(session: AsyncSession) -> SettlementOut:
            verified = await accepted_verification(
                session, data.verification_id, terminal.organisation_id, Purpose.MEDICAL.label
            )
            settled = await settle_medical_bill(session, coverage, verified, data.total_fen)
            details = settled.transaction.details
            return SettlementOut(
                transaction_id=settled.transaction.id,
                verification_id=data.verification_id,
                total_fen=data.total_fen,
                insurance_fen=settled.insurance_fen,
                holder_fen=settled.holder_fen,
                share_bp=int(details["share_bp"]),
                cross_region=bool(details["cross_region"]),
                created_at=settled.transaction.created_at,
            )

        return await run_once(sessions, request, f"terminal:{terminal.key}", idempotency_key, SettlementOut, work)


class OperatorMoneyController(Controller):
    """Subsidy payouts and the daily reconciliation."""

    path = "/v1/operator"
    tags = ["money"]
    security = OPERATOR_SECURITY

    @post(
        "/subsidy-batches",
        status_code=201,
        summary="Pay a batch of subsidies",
        request_max_body_size=200_000,
        responses=problem_responses(401, 403, 409, 413),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def subsidies(
        self,
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        actor: NamedDependency[Actor],
        request: Request[Any, Any, Any],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[SubsidyBatch],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[SubsidyBatchOut]:
        """Up to 1,000 payouts from the region's subsidy fund to cards of the region, all or nothing."""
        require_region(operator, data.region)
        batch_id = "sb_" + secrets.token_urlsafe(9)

        async def work(session: AsyncSession) -> SubsidyBatchOut:
            payouts = [(payout.card_id, payout.amount_fen) for payout in data.payouts]
            await pay_subsidies(session, data.region, batch_id, payouts, data.reason)
            total = sum(amount for _, amount in payouts)
            record(
                session, actor, "subsidy_batch.paid", subject_type="subsidy_batch",
                subject_id=batch_id, region=data.region, reason=data.reason,
                after={"payouts": len(payouts), "total_fen": total},
            )  # fmt: skip
            return SubsidyBatchOut(batch_id, data.region, len(payouts), total)

        return await run_once(
            sessions, request, f"operator:{operator.operator_id}", idempotency_key, SubsidyBatchOut, work
        )

    @get(
        "/verifier-organisations/{organisation_id:uuid}/reconciliation",
        summary="An organisation's daily reconciliation",
        responses=problem_responses(401, 403, 404),
        guards=[requires(Role.VERIFIER_MANAGER, Role.AUDITOR)],
    )
    async def reconciliation(
        self,
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        organisation_id: FromPath[uuid.UUID],
        day: Annotated[date | None, QueryParameter(name="day", required=False)] = None,
    ) -> ReconciliationOut:
        """The day's (UTC, default today) movements of the organisation by kind and account; they sum to zero."""
        organisation = await get_organisation(session, organisation_id, operator.regions)
        found = await daily_reconciliation(session, organisation.id, day or utcnow().date())
        return ReconciliationOut(
            organisation_id=found.organisation_id,
            day=found.day,
            transactions=found.transactions,
            by_kind=found.by_kind,
            total_fen=found.total_fen,
            balanced=found.total_fen == 0,
        )


class HolderMoneyController(Controller):
    """The holder's account: balance and movements."""

    path = "/v1/holder"
    tags = ["holder"]
    security = HOLDER_SECURITY

    @get("/transactions", summary="Balance and transactions", responses=problem_responses(401, 503))
    async def transactions(
        self,
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=200)] = 50,
        before: Annotated[datetime | None, QueryParameter(name="before", required=False)] = None,
    ) -> StatementOut:
        """The card account's balance in fen (subsidies received minus fares and bill shares paid) and movements."""
        balance, movements = await card_statement(
            session, holder.session.ecard_id, limit=limit, before=as_utc(before) if before else None
        )
        return StatementOut(
            balance_fen=balance,
            movements=[
                MovementOut(m.transaction_id, m.kind, m.amount_fen, m.at, m.organisation, m.details) for m in movements
            ],
        )

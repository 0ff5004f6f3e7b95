"""Terminal endpoints for library loans and park entries; the holder's loans."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import LibraryLoan, VerifierOrganisation
from app.domain import errors
from app.domain.agreements.rules import AcceptanceRules
from app.domain.ledger.services import accepted_verification
from app.domain.lending.schemas import LoanOut, LoanRequest, ParkEntryOut, ParkEntryRequest, ReturnRequest
from app.domain.lending.services import card_loans, enter_park, lend, take_back
from app.domain.verification.directory import TerminalEntry
from app.http.auth import HOLDER_SECURITY, TERMINAL_SECURITY, AuthenticatedHolder
from app.http.idempotent import IdempotencyKey, run_once
from app.http.problems import problem_responses
from crypto.credential import Purpose


def _loan_out(loan: LibraryLoan, lender: str) -> LoanOut:
    return LoanOut(
        loan_id=loan.id, item_id=loan.item_id, lent_at=loan.lent_at, due_at=loan.due_at, lent_by=lender,
        returned_at=loan.returned_at, returned_to=loan.returned_to,
    )  # fmt: skip


class LendingController(Controller):
    """Library loans and park entries, each bound to a verification of the terminal's organisation."""

    path = "/v1/terminal"
    tags = ["money"]
    security = TERMINAL_SECURITY
    request_max_body_size = 2048

    @post("/library-loans", status_code=201, summary="Lend an item", responses=problem_responses(401, 403, 404, 409))
    async def loan(
        self,
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        terminal: NamedDependency[TerminalEntry],
        request: Request[Any, Any, Any],
        data: JSONBody[LoanRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[LoanOut]:
        """One item per library verification; 409 while the item is out."""
        if Purpose.LIBRARY not in terminal.purposes:
            raise errors.Forbidden("this terminal does not lend")

        async def work(session: AsyncSession) -> LoanOut:
            verified = await accepted_verification(
                session, data.verification_id, terminal.organisation_id, Purpose.LIBRARY.label
            )
            loan = await lend(session, verified, data.item_id, data.days)
            return _loan_out(loan, verified.organisation.name)

        return await run_once(sessions, request, f"terminal:{terminal.key}", idempotency_key, LoanOut, work)

    @post(
        "/library-returns",
        status_code=201,
        summary="Take an item back",
        responses=problem_responses(401, 403, 404, 409),
    )
    async def give_back(
        self,
        rules: NamedDependency[AcceptanceRules],
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        terminal: NamedDependency[TerminalEntry],
        request: Request[Any, Any, Any],
        data: JSONBody[ReturnRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[LoanOut]:
        """At any library of the lending library's network (its province, or an agreement covering libraries)."""
        if Purpose.LIBRARY not in terminal.purposes:
            raise errors.Forbidden("this terminal does not take returns")

        async def work(session: AsyncSession) -> LoanOut:
            organisation = await session.get_one(VerifierOrganisation, terminal.organisation_id)
            loan, lender = await take_back(session, rules, organisation, data.item_id)
            return _loan_out(loan, lender.name)

        return await run_once(sessions, request, f"terminal:{terminal.key}", idempotency_key, LoanOut, work)

    @post(
        "/park-entries", status_code=201, summary="Count a park entry", responses=problem_responses(401, 403, 404, 409)
    )
    async def park_entry(
        self,
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        terminal: NamedDependency[TerminalEntry],
        request: Request[Any, Any, Any],
        data: JSONBody[ParkEntryRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[ParkEntryOut]:
        """Count the entry against the card's annual pass valid in this province; 409 without one."""
        if Purpose.PARK not in terminal.purposes:
            raise errors.Forbidden("this terminal is not a park gate")

        async def work(session: AsyncSession) -> ParkEntryOut:
            verified = await accepted_verification(
                session, data.verification_id, terminal.organisation_id, Purpose.PARK.label
            )
            entered = await enter_park(session, verified)
            return ParkEntryOut(entered.entry.id, entered.pass_valid_until, entered.entries_on_pass)

        return await run_once(sessions, request, f"terminal:{terminal.key}", idempotency_key, ParkEntryOut, work)


class HolderLoansController(Controller):
    """The holder's library loans."""

    path = "/v1/holder"
    tags = ["holder"]
    security = HOLDER_SECURITY

    @get("/loans", summary="Library loans", responses=problem_responses(401, 503))
    async def loans(
        self,
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=200)] = 50,
    ) -> list[LoanOut]:
        """Newest first, returned ones included (with where they came back)."""
        return [_loan_out(loan, name) for loan, name in await card_loans(session, holder.session.ecard_id, limit)]
